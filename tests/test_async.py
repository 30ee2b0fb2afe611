"""train.mode: async end to end: rollout and training overlap, data stays within the
staleness bound, weights advance every step, the off-policy mismatch is logged."""

from __future__ import annotations

import json

import pytest

from forge.config import ConfigError, load_config


def async_config(**overrides: object):
    base = {
        "train.mode": "async", "train.max_steps": 3, "train.loss": "cispo", "train.tis_cap": 2.0,
        "rollout.num_workers": 1, "rollout.tasks_per_step": 2, "rollout.group_size": 2,
        "rollout.max_turns": 2, "rollout.max_new_tokens": 2, "rollout.num_cpus_per_worker": 1,
        "env.kwargs": "{n: 8}", "logging.tensorboard": False, "logging.progress_bar": False,
        "async.max_staleness": 1,
    }
    base.update(overrides)
    return load_config(None, [f"{key}={value}" for key, value in base.items()])


def test_async_mode_cannot_resume_yet(tmp_path):
    from forge.orchestrator import train

    with pytest.raises(ConfigError, match="async"):
        train(async_config(), tmp_path, progress=False, resume=True)


@pytest.mark.slow
def test_an_async_run_trains_within_the_staleness_bound(ray_session, tmp_path):
    from forge.orchestrator import train

    result = train(async_config(), tmp_path, progress=False)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 3 and [r["step"] for r in records] == [1, 2, 3]
    assert [r["policy_version"] for r in records] == [1.0, 2.0, 3.0]
    assert all(r["staleness_max"] <= 1 for r in records)
    # Loss metrics describe the trained samples: a step whose samples all had advantage 0
    # (skipped, train.skip_zero_advantage) reports none.
    trained = [r for r in records if r["zero_advantage_skipped"] < 1.0]
    assert trained and all(r["mismatch_kl"] >= 0 for r in trained)
    assert all("mismatch_kl" not in r for r in records if r["zero_advantage_skipped"] == 1.0)
    assert all(0 <= r["trainer_idle_fraction"] <= 1 and 0 <= r["rollout_idle_fraction"] <= 1 for r in records)
    assert (tmp_path / "final" / "config.json").is_file()


@pytest.mark.slow
def test_an_async_run_survives_a_killed_worker_and_counts_its_episodes_lost(ray_session, tmp_path, monkeypatch):
    import threading
    import time

    from forge import orchestrator

    runs = []

    class RecordingRun(orchestrator.Run):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

    def kill_after_first_step():
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.05)
        ray_session.kill(runs[0].workers[0], no_restart=False)

    monkeypatch.setattr(orchestrator, "Run", RecordingRun)
    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    cfg = async_config(**{"train.max_steps": 8, "rollout.num_workers": 2, "rollout.max_turns": 4})
    result = orchestrator.train(cfg, tmp_path, progress=False)
    killer.join(timeout=5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 8
    assert sum(r["episodes_lost"] for r in records) > 0
