"""train.mode: async end to end: rollout and training overlap, data stays within the
staleness bound, weights advance every step, the off-policy mismatch is logged."""

from __future__ import annotations

import json

import pytest

from forge.config import load_config


def async_config(**overrides: object):
    base = {
        "train.mode": "async",
        "train.max_steps": 3,
        "train.loss": "cispo",
        "train.tis_cap": 2.0,
        "rollout.num_workers": 1,
        "rollout.tasks_per_step": 2,
        "rollout.group_size": 2,
        "rollout.max_turns": 2,
        "rollout.max_new_tokens": 2,
        "rollout.num_cpus_per_worker": 1,
        "env.kwargs": "{n: 8}",
        "logging.tensorboard": False,
        "logging.progress_bar": False,
        "async.max_staleness": 1,
        # Two-token replies rarely solve a task: these runs test the loop, not learning.
        "train.max_steps_without_signal": 0,
    }
    base.update(overrides)
    return load_config(None, [f"{key}={value}" for key, value in base.items()])


def test_resuming_an_async_run_without_checkpoints_names_the_setting(tmp_path):
    from forge.run.launch import train
    from forge.train.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoint_every"):
        train(async_config(), tmp_path, progress=False, resume=True)


def test_requeued_tasks_are_taken_first_then_the_stream_goes_on():
    from forge.run.tasks import TaskStream

    tasks = [{"id": i} for i in range(5)]
    plain, resumed = TaskStream(tasks, seed=3), TaskStream(tasks, seed=3)
    resumed.requeued = [{"id": 9}, {"id": 8}]
    assert resumed.take(3) == [{"id": 9}, {"id": 8}, *plain.take(1)]
    assert resumed.requeued == [] and resumed.take(4) == plain.take(4)


@pytest.mark.slow
def test_an_async_run_checkpoints_and_resumes_with_the_tasks_it_had_started(
    ray_session, tmp_path, monkeypatch
):
    """Each checkpoint holds exactly its step's trainer state (nothing was queued behind
    it) and the tasks of the groups in flight or waiting; the resumed run plays those
    first and goes on from the step and policy version it stopped at."""
    import pickle

    import torch

    from forge.run.launch import train
    from forge.run.tasks import load_task_rows

    cfg = async_config(**{"train.max_steps": 4, "train.checkpoint_every": 2, "train.keep_checkpoints": 0})
    train(cfg, tmp_path, progress=False)
    rows = load_task_rows(cfg)
    for step in (2, 4):
        directory = tmp_path / "checkpoints" / f"step-{step:06d}"
        trainer = torch.load(directory / "trainer.pt", weights_only=False)
        assert trainer["policy_version"] == step  # no later step had reached the trainer
        state = pickle.loads((directory / "run_state.pkl").read_bytes())
        assert state["step"] == step and state["worker_rng"] is None
        assert all(task in rows for task in state["requeued"])
    # The pool reserves groups ahead of the trainer, so some were in flight at step 2.
    requeued = pickle.loads((tmp_path / "checkpoints" / "step-000002" / "run_state.pkl").read_bytes())[
        "requeued"
    ]
    assert requeued

    played = []
    from forge.run import context

    class RecordingStream(context.TaskStream):
        def take(self, count):
            taken = super().take(count)
            played.extend(taken)
            return taken

    monkeypatch.setattr(context, "TaskStream", RecordingStream)
    result = train(
        async_config(**{"train.max_steps": 6, "train.checkpoint_every": 2}),
        tmp_path,
        progress=False,
        resume=True,
    )
    final = pickle.loads((tmp_path / "checkpoints" / "step-000004" / "run_state.pkl").read_bytes())[
        "requeued"
    ]
    assert played[: len(final)] == final  # the started tasks first
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 6 and [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert [r["policy_version"] for r in records[4:]] == [5.0, 6.0]


@pytest.mark.slow
def test_an_async_run_trains_within_the_staleness_bound(ray_session, tmp_path):
    from forge.run.launch import train

    # The smoke board (4 numbers, 3 one-token guesses) in groups of 8 gives groups mixed outcomes,
    # so some step trains: groups of 2 on 8 numbers were all failures at times (nothing trained),
    # and so were all six groups of 4 once the pool held 4 groups instead of 3.
    overrides = {
        "rollout.group_size": 8,
        "env.kwargs": "{n: 4}",
        "rollout.max_turns": 3,
        "rollout.max_new_tokens": 1,
    }
    result = train(async_config(**overrides), tmp_path, progress=False)
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
def test_an_async_run_survives_a_killed_worker_and_counts_its_episodes_lost(
    ray_session, tmp_path, monkeypatch
):
    import threading
    import time

    from forge.run import context, launch

    runs = []

    class RecordingRun(context.Run):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            runs.append(self)

    def kill_after_first_step():
        metrics = tmp_path / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (metrics.is_file() and metrics.read_text().strip()):
            time.sleep(0.05)
        ray_session.kill(runs[0].workers[0], no_restart=False)

    monkeypatch.setattr(context, "Run", RecordingRun)
    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    cfg = async_config(**{"train.max_steps": 8, "rollout.num_workers": 2, "rollout.max_turns": 4})
    result = launch.train(cfg, tmp_path, progress=False)
    killer.join(timeout=5)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 8
    assert sum(r["episodes_lost"] for r in records) > 0


def test_a_worker_that_dies_with_two_calls_in_flight_is_told_once_with_every_lost_episode():
    from types import SimpleNamespace

    from forge.run.async_ import AsyncLoop, BusyClock, RolloutCall

    told: list[tuple[int, int]] = []
    worker = SimpleNamespace(get_policy_version=SimpleNamespace(remote=lambda: object()))
    loop = AsyncLoop.__new__(AsyncLoop)
    loop.run = SimpleNamespace(
        workers=[worker], tell_worker_death=lambda index, lost: told.append((index, lost))
    )
    loop.cfg = SimpleNamespace(rollout=SimpleNamespace(group_size=4))
    loop.in_flight = {"first": RolloutCall([0, 1], 0, [{}, {}]), "second": RolloutCall([2], 0, [{}])}
    loop.groups_in_flight, loop.clocks = [3], [BusyClock()]
    loop.clocks[0].start(), loop.clocks[0].start()
    loop.lost, loop.lost_by_death, loop.arrived = 0, {}, []
    loop.needs_sync, loop.down, loop.probes = set(), set(), {}
    loop.worker_died("first", "rollout worker died: killed")
    assert told == []  # its other call has not raised yet
    loop.worker_died("second", "rollout worker died: killed")
    assert told == [(0, 12)] and loop.lost == 12


def test_staleness_tokens_count_every_trained_token_once_subagents_included():
    """An async step's `staleness_tokens/K` counts the tokens it trains on, by lag: with
    swarm.train_subagents the sub-agents' samples are trained too, and counted (they were not:
    only the orchestrators' tokens were)."""
    from types import SimpleNamespace

    from forge.reward.shaping import RewardShaper
    from forge.run.async_ import AsyncLoop
    from forge.types import NO_VERSION, Trajectory, Turn

    def episode(version: int, success: bool, group: str, subagents=()) -> Trajectory:
        return Trajectory("t", group, [1, 2, 3, 4], [0, 1, 1, 1], [0.0, -0.5, -0.5, -0.5],
                          [NO_VERSION, version, version, version], 1, turns=[Turn(1, 4, 4)],
                          outcome=float(success), success=success, subagents=list(subagents),
                          parent_turn=0 if group.endswith("/sub") else None)  # fmt: skip

    # Orchestrators sampled at version 2, their sub-agents (spawned later) at version 3.
    group = [
        episode(2, True, "g", [episode(3, True, "g/sub"), episode(3, False, "g/sub")]),
        episode(2, False, "g", [episode(3, False, "g/sub")]),
    ]
    handed: list = []
    loop = AsyncLoop.__new__(AsyncLoop)
    loop.cfg = load_config("configs/swarm.yaml", ["train.mode=async"])
    assert loop.cfg.swarm.train_subagents
    trainer = SimpleNamespace(train_and_publish=SimpleNamespace(remote=lambda s: handed.append(s) or "ref"))
    loop.run = SimpleNamespace(shaper=RewardShaper(loop.cfg.reward), trainer=trainer)
    loop.trainer_version, loop.queued, loop.submitted = 4, [], 0
    loop.left_out, loop.leave_out_at_most = [], 0  # no dynamic sampling
    loop.submit([group], {})
    (samples,) = handed
    assert len(samples) == 5  # two orchestrators, three sub-agents
    metrics = loop.queued[0][2]
    counted = {key: n for key, n in metrics.items() if key.startswith("staleness_tokens/")}
    assert counted == {"staleness_tokens/1": 9.0, "staleness_tokens/2": 6.0}
    assert sum(counted.values()) == sum(sum(sample.loss_mask) for sample in samples)
