"""Sync mode survives a rollout worker that dies mid-rollout."""

from __future__ import annotations

import json

import pytest

from forge.config import load_config


@pytest.mark.slow
def test_a_worker_killed_mid_rollout_is_restarted_and_its_episodes_are_counted_lost(
    ray_session, tmp_path, monkeypatch
):
    from forge import orchestrator

    class KillingRun(orchestrator.Run):
        launches = 0

        def launch_rollouts(self):
            calls = super().launch_rollouts()
            KillingRun.launches += 1
            if KillingRun.launches == 2:  # the second step's episodes are in flight
                ray_session.kill(self.workers[0], no_restart=False)
            return calls

    monkeypatch.setattr(orchestrator, "Run", KillingRun)
    cfg = load_config("configs/smoke.yaml", [
        "train.max_steps=4", "rollout.tasks_per_step=2", "rollout.group_size=4", "rollout.num_workers=2",
    ])
    result = orchestrator.train(cfg, tmp_path, progress=False)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 4
    assert [r["episodes_lost"] for r in rows] == [0.0, 4.0, 0.0, 0.0]
    assert rows[1]["episodes"] == 4.0  # the other worker's group still trained
    assert [r["policy_version"] for r in rows] == [1.0, 2.0, 3.0, 4.0]


def test_a_run_asking_for_more_cpus_than_the_cluster_has_fails_fast_with_the_keys(ray_session, tmp_path):
    from forge.config import ConfigError
    from forge.orchestrator import train

    total = ray_session.cluster_resources()["CPU"]
    cfg = load_config("configs/smoke.yaml", [f"train.num_cpus={total}", "train.max_steps=1"])
    with pytest.raises(ConfigError, match=r"train\.num_cpus=.*rollout\.num_cpus_per_worker=0\.5.*Ray cluster has"):
        train(cfg, tmp_path / "run", progress=False)  # Ray would otherwise wait forever to place actors
