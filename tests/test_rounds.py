"""Dynamic sampling (rollout.max_rounds_per_step): a sync step plays rounds until it has a
batch of groups with learning signal, and trains on those alone."""

from __future__ import annotations

import itertools
import json

import pytest

from forge.config import ConfigError, load_config
from forge.failures import RunStopped
from forge.reward.shaping import RewardShaper
from forge.run.context import shape_rewards
from forge.run.rounds import groups_with_signal, next_round_tasks, play_step
from forge.types import Trajectory

_ids = itertools.count()


def group(
    successes: str, lost: bool = False, task: str | None = None, seconds: float = 1.0
) -> list[Trajectory]:
    """A group of episodes, one per character: 1 succeeded, 0 failed; the i-th took `seconds` + i."""
    group_id = f"g{next(_ids)}"
    return [
        Trajectory(
            task_id=task or group_id,
            group_id=group_id,
            token_ids=[1, 2],
            loss_mask=[0, 1],
            behaviour_logprobs=[0.0, -1.0],
            policy_versions=[-1, 0],
            prompt_length=1,
            outcome=float(s == "1"),
            success=s == "1",
            status="lost" if lost else "ok",
            error="worker died" if lost else None,
            wall_seconds=seconds + i,
        )
        for i, s in enumerate(successes)
    ]


class ScriptedRun:
    """A run whose rounds return prepared groups: round r plays the first `count` of rounds[r]."""

    def __init__(self, rounds: list[list[list[Trajectory]]], overrides: list[str]) -> None:
        self.cfg = load_config("configs/smoke.yaml", ["rollout.group_size=2", *overrides])
        self.rounds = iter(rounds)
        self.counts: list[int] = []
        self.shaper = RewardShaper(self.cfg.reward)

    def rollout(self, count: int | None = None) -> list[Trajectory]:
        count = count or self.cfg.rollout.tasks_per_step
        self.counts.append(count)
        return [t for g in next(self.rounds)[:count] for t in g]


def test_one_round_trains_on_every_group_played_as_before():
    played = [group("11"), group("10"), group("00")]
    run = ScriptedRun([played], ["rollout.tasks_per_step=3"])
    step = play_step(run, 1)
    assert step.trained == step.played == [t for g in played for t in g]
    assert step.advantages[2] > 0 > step.advantages[3] and step.metrics == {} and run.counts == [3]


def gid(episodes: list[Trajectory]) -> str:
    return episodes[0].group_id


def trained_groups(step) -> list[str]:
    return list(dict.fromkeys(t.group_id for t in step.trained))


def test_rounds_go_on_until_a_batch_of_groups_has_signal_and_train_on_those_alone():
    first = [group("11"), group("10"), group("00"), group("00")]  # 1 group of 4 with signal
    second = [group("01"), group("00"), group("10"), group("11")]  # 2 more
    third = [group("10"), group("01"), group("01")]
    run = ScriptedRun([first, second, third], ["rollout.tasks_per_step=4", "rollout.max_rounds_per_step=5"])
    step = play_step(run, 1)
    # Round 2: 3 missing at 1 in 4 would take 12 tasks, a round plays 4 at most; round 3:
    # 1 missing at 3 in 8 takes 3.
    assert run.counts == [4, 4, 3]
    assert step.played == [t for g in first + second + third for t in g]
    assert trained_groups(step) == [gid(first[1]), gid(second[0]), gid(second[2]), gid(third[0])]
    assert step.metrics == {"sampling/rounds": 3.0, "sampling/groups_with_signal": 6.0,
                            "sampling/groups_trained": 4.0}  # fmt: skip
    assert len(step.advantages) == len(step.trained) == 8 and all(a != 0 for a in step.advantages)
    assert step.reward_metrics["reward/success_rate"] == pytest.approx(10 / 22)  # every episode played


def test_a_step_that_runs_out_of_rounds_trains_on_the_groups_with_signal_it_found():
    run = ScriptedRun([[group("00"), group("10")], [group("11"), group("00")]],
                      ["rollout.tasks_per_step=2", "rollout.max_rounds_per_step=2"])  # fmt: skip
    step = play_step(run, 1)
    assert len(step.played) == 8 and len(trained_groups(step)) == 1
    assert step.metrics["sampling/rounds"] == 2.0 and step.metrics["sampling/groups_trained"] == 1.0
    assert run.counts == [2, 2]  # 1 missing at 1 in 2: 2 tasks


def test_a_round_with_no_signal_yet_plays_a_whole_round_and_lost_groups_are_replaced():
    run = ScriptedRun([[group("00", lost=True), group("11")], [group("10"), group("01")]],
                      ["rollout.tasks_per_step=2", "rollout.max_rounds_per_step=2"])  # fmt: skip
    step = play_step(run, 1)
    assert run.counts == [2, 2] and len(trained_groups(step)) == 2
    assert all(t.status == "ok" for t in step.trained)


def test_a_step_whose_every_episode_is_lost_stops_the_run_but_a_lost_later_round_does_not():
    run = ScriptedRun(
        [[group("00", lost=True)] * 2], ["rollout.tasks_per_step=2", "rollout.max_rounds_per_step=3"]
    )
    with pytest.raises(RunStopped, match="every episode was lost, e.g. worker died"):
        play_step(run, 1)
    run = ScriptedRun([[group("10"), group("00")], [group("11", lost=True)] * 2, [group("01")]],
                      ["rollout.tasks_per_step=2", "rollout.max_rounds_per_step=3"])  # fmt: skip
    assert len(trained_groups(play_step(run, 1))) == 2


def test_a_task_speed_baseline_takes_each_episode_once_however_many_rounds_shaped_it():
    """Each round shapes every episode played so far: the per-task moving baseline must end as
    one shaping of them all leaves it, not moved once per round."""
    overrides = ["rollout.tasks_per_step=2", "rollout.max_rounds_per_step=3", "reward.speed.enabled=true",
                 "reward.speed.baseline=task_moving_average", "reward.speed.measure=wall_seconds"]  # fmt: skip
    # The same two tasks in every round, each round slower: a baseline moved once per round
    # would score the later rounds' episodes against another value.
    rounds = [[group("11", task="a"), group("00", task="b")], [group("11", task="a", seconds=3), group("11", task="b")],
              [group("10", task="b", seconds=5), group("11", task="a", seconds=9)]]  # fmt: skip
    run = ScriptedRun(rounds, overrides)
    step = play_step(run, 1)
    rewards = [t.reward for t in step.played]
    once = RewardShaper(run.cfg.reward)
    once.shape(step.played, progress=0.0)
    assert (
        run.counts == [2, 2] and run.shaper.task_baselines == once.task_baselines
    )  # an all-success group has signal: speed
    assert [t.reward for t in step.played] == rewards


def test_next_round_plays_what_the_rate_so_far_says_it_takes_at_most_a_round():
    assert next_round_tasks(missing=1, signal_rate=0.5, most=8) == 2
    assert next_round_tasks(missing=3, signal_rate=0.25, most=8) == 8
    assert next_round_tasks(missing=5, signal_rate=0.0, most=8) == 8
    assert next_round_tasks(missing=2, signal_rate=1.0, most=8) == 2


def test_groups_with_signal_are_those_with_a_nonzero_advantage_not_lost_in_play_order():
    a, b, c = group("10"), group("11"), group("01", lost=True)
    cfg = load_config("configs/smoke.yaml")
    assert groups_with_signal(b + a + c, [0.0, 0.0, 1.0, -1.0, 1.0, -1.0], cfg) == [gid(a)]


def test_a_group_whose_only_signal_is_in_its_subagents_has_signal_when_they_are_trained():
    """swarm.train_subagents trains each sub-agent on its own advantage: a team whose
    orchestrators all scored alike still teaches its sub-agents (a swarm run with rounds on
    trained nothing at exit 0 before: its rounds kept no group, its signal_fraction counted
    the sub-agents)."""
    cfg = load_config(
        "configs/smoke.yaml",
        ["swarm.enabled=true", "swarm.train_subagents=true", "swarm.subagent_policy=current"],
    )
    alike = group("00")
    for orchestrator, finished in zip(alike, "10", strict=True):
        sub = group(finished)[0]
        sub.group_id, sub.depth, sub.parent_turn = orchestrator.group_id + "/sub", 1, 0
        sub.reward = sub.outcome  # as the agent loop sets it: 1 when it finished its sub-task
        orchestrator.subagents = [sub]
    plain = group("11")
    _, advantages = shape_rewards(RewardShaper(cfg.reward), plain + alike, cfg)
    assert advantages == [0.0] * 4  # no orchestrator has any
    assert groups_with_signal(plain + alike, advantages, cfg) == [gid(alike)]
    without = load_config("configs/smoke.yaml", ["swarm.enabled=true", "swarm.train_subagents=false"])
    assert groups_with_signal(plain + alike, advantages, without) == []


def test_rounds_are_refused_in_gateway_runs_where_forge_does_not_play_the_groups():
    with pytest.raises(ConfigError, match=r"max_rounds_per_step=3 \(dynamic sampling\).*gateway runs cannot"):
        load_config("configs/smoke.yaml", ["rollout.max_rounds_per_step=3", "gateway.enabled=true"])


def test_verls_name_for_it_points_at_forges():
    with pytest.raises(ConfigError, match="did you mean rollout.max_rounds_per_step"):
        load_config("configs/smoke.yaml", ["rollout.max_num_gen_batches=3"])


@pytest.mark.slow
def test_a_sync_run_with_rounds_trains_full_batches_of_groups_with_signal(ray_session, tmp_path):
    from forge.run.launch import train

    cfg = load_config("configs/smoke.yaml", ["train.max_steps=4", "rollout.tasks_per_step=4",
                      "rollout.group_size=4", "rollout.max_rounds_per_step=4",
                      "train.skip_zero_advantage=false"])  # fmt: skip
    train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for row in rows:
        assert 1 <= row["sampling/rounds"] <= 4 and row["episodes"] >= 16
        assert row["sampling/groups_trained"] == min(4.0, row["sampling/groups_with_signal"])
        full = row["sampling/groups_with_signal"] >= 4
        assert full or row["sampling/rounds"] == 4  # a step stops early only with a full batch
        # The trainer gets the kept groups' episodes and no other (none is skipped here, so
        # a group without signal would count too).
        assert row["trained_samples"] == 4 * row["sampling/groups_trained"]
    assert any(row["sampling/rounds"] > 1 for row in rows)  # the tiny model fails most tasks at first


@pytest.mark.slow
def test_an_async_run_leaves_out_groups_without_signal_within_its_budget(ray_session, tmp_path):
    from forge.run.launch import train

    cfg = load_config("configs/smoke.yaml", ["train.mode=async", "train.max_steps=5", "rollout.tasks_per_step=4",
                      "rollout.group_size=4", "rollout.num_workers=1", "rollout.max_rounds_per_step=3"])  # fmt: skip
    train(cfg, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5]
    budget = 2 * 4  # (max_rounds_per_step - 1) x tasks_per_step groups per batch
    for before, row in zip([None, *rows], rows, strict=False):
        left_out = row["sampling/groups_left_out"]
        assert 0 <= left_out <= budget and row["episodes"] == 4 * (4 + left_out), (
            rows
        )  # counted with the step
        # Within budget every group it trains on has signal: none is skipped for a zero advantage.
        # A group that finished while the step before had spent its budget went to the pool, and
        # may be trained in this batch (the pool holds two batches: never one later).
        if left_out < budget and (before is None or before["sampling/groups_left_out"] < budget):
            assert row["zero_advantage_skipped"] == 0.0, rows
    # Not asserted that some step was within budget: a trainer slowed by a busy machine lets
    # the worker finish more groups a step, and every step may spend it (the budget's own
    # logic is tested without timing below).
    # The tiny model fails most tasks at first.
    assert any(row["sampling/groups_left_out"] > 0 for row in rows), rows
    assert rows[-1]["pool/dropped_no_signal"] >= sum(row["sampling/groups_left_out"] for row in rows), rows


def test_the_async_driver_leaves_out_groups_without_signal_up_to_its_budget_and_counts_them_with_the_next_batch():
    from types import SimpleNamespace

    from forge.run.async_ import AsyncLoop

    handed: list = []
    loop = AsyncLoop.__new__(AsyncLoop)
    loop.cfg = load_config("configs/smoke.yaml", ["train.mode=async", "rollout.tasks_per_step=2",
                           "rollout.group_size=2", "rollout.max_rounds_per_step=2"])  # fmt: skip
    trainer = SimpleNamespace(train_and_publish=SimpleNamespace(remote=lambda s: handed.append(s) or "ref"))
    loop.run = SimpleNamespace(shaper=RewardShaper(loop.cfg.reward), trainer=trainer)
    loop.trainer_version, loop.queued, loop.submitted = 0, [], 0
    loop.leave_out_at_most, loop.left_out = 2, []  # (2 - 1) x 2 groups per batch
    alike, mixed, lost = group("00"), group("10"), group("00", lost=True)
    assert not loop.leaves_out(mixed) and not loop.leaves_out(lost)  # the pool drops a lost one
    assert loop.leaves_out(alike)
    solved = group("11")
    loop.left_out += [alike, solved]
    assert not loop.leaves_out(group("00"))  # the budget is spent: it goes to the pool
    assert [t.reward for t in alike] == [0.0, 0.0] and loop.run.shaper.task_baselines == {}

    batch = [mixed, group("01")]
    loop.submit(batch, {})
    (samples,) = handed
    assert len(samples) == 4  # the batch's episodes alone are trained
    _, trajectories, metrics = loop.queued[0]
    assert trajectories == alike + solved + mixed + batch[1]  # the left out first: counted, not trained
    assert metrics["sampling/groups_left_out"] == 2.0 and metrics["reward/success_rate"] == 4 / 8
    assert loop.left_out == []  # the next batch has its own budget
