"""Long runs stay flat: a shortened soak of a sync run fails on any process of the run
(Forge's or Ray's) whose resident memory, open files or threads keep growing."""

from __future__ import annotations

import pytest

from bench.soak import slope_per_1000, soak_mode, summarize

# MB per 1,000 steps and process over the second half. Ray's GCS grew 15-18 before its task
# events were capped (`forge.run.cluster.TASK_EVENTS_IN_GCS`); in bench/results/soak.json's
# 1,500 sync steps the steepest, a rollout worker still warming up, is 2.8 (its last 500
# steps +0.3 MB), the GCS 0.8. Open fds and threads may rise by a few while pools start.
MAX_RSS_SLOPE_MB = 5.0
MAX_HANDLE_RISE = 4


def test_slope_is_taken_over_the_second_half_of_the_steps():
    warming_then_flat = [(step, min(step, 500) * 0.1) for step in range(0, 2001, 50)]
    assert slope_per_1000(warming_then_flat) == 0.0
    growing = [(step, 100 + step * 0.018) for step in range(0, 2001, 50)]
    assert slope_per_1000(growing) == pytest.approx(18.0)


def test_summary_reports_start_end_and_slope_per_process_kind():
    series = [
        {
            "step": step,
            "processes": {
                "gcs_server": {"rss_mb": 50 + step * 0.01, "fds": 60, "threads": 27, "processes": 1}
            },
        }
        for step in range(0, 1001, 100)
    ]
    gcs = summarize(series)["gcs_server"]
    assert gcs["rss_mb"]["start"] == 51.0 and gcs["rss_mb"]["end"] == 60.0
    assert gcs["rss_mb"]["slope_per_1000_steps"] == pytest.approx(10.0)
    assert gcs["fds"]["slope_per_1000_steps"] == 0.0


@pytest.mark.slow
@pytest.mark.xfail(
    strict=False,
    reason="issue #27 open: on an idle 2-core machine the trainer and each rollout worker grew 7-8 MB per "
    "1,000 steps over the second half of this 1,500-step soak (CI clean-clone run, 2026-12-05); "
    "under heavy load the same test measured 2.6-2.8 and passed. Cause not yet found",
)
def test_a_shortened_sync_soak_has_no_growing_process(tmp_path):
    result = soak_mode("sync", steps=1500, every_s=2.0, workdir=tmp_path, extra=[])
    assert result["samples"] >= 10, f"too few samples to fit a slope: {result['samples']}"
    growing = {
        kind: values["rss_mb"]["slope_per_1000_steps"] / values["processes"]
        for kind, values in result["processes"].items()
        if values["rss_mb"]["slope_per_1000_steps"] / values["processes"] > MAX_RSS_SLOPE_MB
    }
    assert not growing, f"resident memory grows (MB per 1,000 steps and process, second half): {growing}"
    for key in ("fds", "threads"):
        rising = {
            kind: values[key]
            for kind, values in result["processes"].items()
            if values[key]["end"] > values[key]["start"] + MAX_HANDLE_RISE
        }
        assert not rising, f"{key} grow over the run: {rising}"


def test_a_local_ray_keeps_a_bounded_number_of_task_events_unless_the_user_set_one(monkeypatch):
    from forge.run.cluster import TASK_EVENTS_IN_GCS, ray_system_config

    monkeypatch.delenv("RAY_task_events_max_num_task_in_gcs", raising=False)
    assert ray_system_config() == {"task_events_max_num_task_in_gcs": TASK_EVENTS_IN_GCS}
    monkeypatch.setenv("RAY_task_events_max_num_task_in_gcs", "500")
    assert ray_system_config() == {}
