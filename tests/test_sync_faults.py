"""Sync mode survives a rollout worker that dies mid-rollout or between rollouts, and says so."""

from __future__ import annotations

import json
import os
import signal

import pytest

from forge.config import load_config


@pytest.mark.slow
def test_a_worker_killed_mid_rollout_is_restarted_and_its_episodes_are_counted_lost(
    ray_session, tmp_path, monkeypatch, capsys
):
    from forge.run import context, launch

    class KillingRun(context.Run):
        launches = syncs = 0

        def launch_rollouts(self, count=None):
            calls = super().launch_rollouts(count)
            KillingRun.launches += 1
            if KillingRun.launches == 2:  # the second step's episodes are in flight
                ray_session.kill(self.workers[0], no_restart=False)
            return calls

        def sync_weights(self, published=None):
            KillingRun.syncs += 1
            if KillingRun.syncs == 3:  # step 3 trained: its weights go to a worker that died idle
                # SIGKILL, as the OOM killer ends it (ray.kill lets the next call in first).
                pid = ray_session.get(self.workers[1].__ray_call__.remote(lambda worker: os.getpid()))
                os.kill(pid, signal.SIGKILL)
            return super().sync_weights(published)

    monkeypatch.setattr(context, "Run", KillingRun)
    cfg = load_config(
        "configs/smoke.yaml",
        [
            "train.max_steps=4",
            "rollout.tasks_per_step=2",
            "rollout.group_size=4",
            "rollout.num_workers=2",
        ],
    )
    result = launch.train(cfg, tmp_path, progress=False)

    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 4
    assert [r["episodes_lost"] for r in rows] == [0.0, 4.0, 0.0, 0.0]
    assert rows[1]["episodes"] == 4.0  # the other worker's group still trained
    assert [r["policy_version"] for r in rows] == [1.0, 2.0, 3.0, 4.0]
    deaths = [
        line for line in capsys.readouterr().err.splitlines() if line.startswith("forge: rollout worker")
    ]
    assert deaths == [
        "forge: rollout worker 0 died (its log above says why; Ray restarts it, up to async.max_worker_restarts "
        "times); its 4 episodes count as lost",
        # Before, a worker that died while the trainer trained was restarted without a word.
        "forge: rollout worker 1 died between rollouts (its log above says why); Ray restarts it, up to "
        "async.max_worker_restarts times, and it is given the current weights again, so no episode is lost",
    ]


def test_a_run_asking_for_more_cpus_than_the_cluster_has_fails_fast_with_the_keys(ray_session, tmp_path):
    from forge.config import ConfigError
    from forge.run.launch import train

    total = ray_session.cluster_resources()["CPU"]
    cfg = load_config("configs/smoke.yaml", [f"train.num_cpus={total}", "train.max_steps=1"])
    with pytest.raises(
        ConfigError, match=r"train\.num_cpus=.*rollout\.num_cpus_per_worker=0\.5.*Ray cluster has"
    ):
        train(cfg, tmp_path / "run", progress=False)  # Ray would otherwise wait forever to place actors


@pytest.mark.slow
def test_a_trainer_that_dies_stops_the_run_with_how_to_resume_it(ray_session, tmp_path, monkeypatch, capsys):
    from forge.cli import main
    from forge.train import checkpoint

    save_run = checkpoint.save_run

    def save_then_kill_the_trainer(run, step, *args, **kwargs):
        path = save_run(run, step, *args, **kwargs)
        if step == 2:
            ray_session.kill(run.trainer)
        return path

    monkeypatch.setattr(checkpoint, "save_run", save_then_kill_the_trainer)
    overrides = [
        "train.max_steps=5",
        "train.checkpoint_every=1",
        "rollout.tasks_per_step=2",
        "rollout.group_size=4",
        "logging.progress_bar=false",
    ]
    assert main(["train", "configs/smoke.yaml", *overrides, "--output-dir", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert "the Trainer actor died, so the run stopped" in error
    assert f"Continue from step-000002 with: forge train configs/smoke.yaml --resume {tmp_path}" in error


def test_only_a_dead_actor_gets_the_resume_advice(tmp_path):
    from ray.exceptions import ActorDiedError

    from forge.run.faults import actor_death_message

    assert actor_death_message(ValueError("bad batch"), tmp_path) is None
    message = actor_death_message(ActorDiedError(), tmp_path)
    assert "died" in message and "set train.checkpoint_every" in message  # nothing to resume from


def test_an_actor_whose_constructor_raised_is_told_by_its_error_not_as_a_death(tmp_path):
    from ray.exceptions import ActorDiedError

    from forge.run.faults import actor_death_message

    class FailedCreation(ActorDiedError):  # what Ray raises for an actor whose __init__ raised
        actor_init_failed = True

        def __str__(self) -> str:
            return (
                "The actor died because of an error raised in its creation task, class_name: EngineActor\n"
                'ray::EngineActor.__init__()\n  File "actor.py", line 9, in __init__\n    raise\n'
                "RuntimeError: no free port on 0.0.0.0"
            )

    message = actor_death_message(FailedCreation(), tmp_path)
    assert message.startswith(
        "the EngineActor actor could not start, so the run stopped: RuntimeError: no free port"
    )
    assert "out of memory" not in message and "set train.checkpoint_every" in message
