"""Faults end episodes, never the run: hung and raising envs, overlong generation, and a
rollout worker killed mid-run (restarted, its episodes counted as lost)."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from forge.config import Config
from forge.env.base import Env, StepResult
from forge.metrics import rollout_metrics
from forge.reward.shaping import trajectory_advantages


class HangingEnv(Env):
    """Guess a number; the step hangs (a stuck sandbox) when the task says so."""

    def reset(self, task, seed):
        self.task = task
        return "guess"

    def step(self, action):
        if self.task.get("hang"):
            time.sleep(30)
        return StepResult("again", reward=0.0, done=False)


class RaisingEnv(Env):
    def reset(self, task, seed):
        return "guess"

    def step(self, action):
        raise RuntimeError("the sandbox exploded")


def make_worker(checkpoint, env_name: str, step_timeout_s: float = 30.0, max_turns: int = 3):
    from forge.rollout.worker import RolloutWorker

    cfg = Config()
    cfg.env.name = env_name
    cfg.env.step_timeout_s = step_timeout_s
    cfg.rollout.max_turns = max_turns
    cfg.rollout.max_new_tokens = 2
    return RolloutWorker(str(checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)


def test_a_hung_env_step_truncates_its_episode_without_stalling_the_others(tiny_checkpoint):
    # The fine episodes end long before the stuck ones' 3 s limit (a slow machine's margin).
    worker = make_worker(tiny_checkpoint, f"{__name__}:HangingEnv", step_timeout_s=3.0)
    tasks = [{"task_id": "stuck", "hang": True}, {"task_id": "fine", "hang": False}]
    started = time.monotonic()
    trajectories = asyncio.run(worker.rollout(tasks, group_size=2))
    stuck = [t for t in trajectories if t.task_id == "stuck"]
    fine = [t for t in trajectories if t.task_id == "fine"]
    assert all(t.status == "truncated" and t.error.startswith("timeout") and t.timed_out for t in stuck)
    # The fine ones end at rollout.max_turns: truncated too, but not by a time limit.
    assert all(t.error is None and t.num_turns == 3 and not t.timed_out for t in fine)
    counts = rollout_metrics(trajectories)
    assert (counts["episodes_truncated"], counts["episodes_timeout"], counts["episodes_error"]) == (
        4.0,
        2.0,
        0.0,
    )
    assert max(t.wall_seconds for t in fine) < 3.0 <= min(t.wall_seconds for t in stuck)
    assert time.monotonic() - started < 20


def test_an_env_that_raises_is_a_failed_episode_with_the_error(tiny_checkpoint):
    worker = make_worker(tiny_checkpoint, f"{__name__}:RaisingEnv")
    trajectories = asyncio.run(worker.rollout([{"task_id": "t"}], group_size=2))
    assert [t.status for t in trajectories] == ["error", "error"]
    assert all("RuntimeError: the sandbox exploded" in t.error for t in trajectories)
    assert rollout_metrics(trajectories)["episodes_error"] == 2.0


def test_generation_past_max_tokens_is_truncated_and_marked(tiny_checkpoint):
    worker = make_worker(tiny_checkpoint, "guess_number", max_turns=2)
    worker.engine.stop_token_ids = torch.tensor([10**6])  # no stop token is ever sampled
    trajectories = asyncio.run(worker.rollout([{"task_id": "t", "secret": 3, "n": 16}], group_size=2))
    turns = [turn for t in trajectories for turn in t.turns]
    assert turns and all(turn.truncated and turn.end - turn.start == 2 for turn in turns)
    for t in trajectories:  # the closing eos the harness adds is not trained on
        assert all(t.loss_mask[turn.end] == 0 for turn in t.turns)


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_its_in_flight_episodes_are_lost(ray_session, tiny_checkpoint):
    from forge.rollout.worker import RolloutWorker
    from forge.run.faults import collect_groups

    ray = ray_session
    cfg = Config()
    cfg.rollout.max_turns = 8
    worker = (
        ray.remote(RolloutWorker)
        .options(max_restarts=1)
        .remote(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, 0, 1)
    )
    task = {"task_id": "t", "secret": 3, "n": 16}
    try:
        assert ray.get(worker.get_policy_version.remote()) == 0  # started
        ref = worker.rollout.remote([task] * 4, 8)
        ray.kill(worker, no_restart=False)
        groups, died = collect_groups(ref, [task] * 4, 8)
        trajectories = [t for group in groups for t in group]
        assert died and len(groups) == 4 and rollout_metrics(trajectories)["episodes_lost"] == 32.0
        deadline = time.monotonic() + 120
        while True:  # calls fail fast while Ray restarts the actor
            try:
                ray.get(worker.get_policy_version.remote(), timeout=30)
                break
            except ray.exceptions.ActorUnavailableError:
                assert time.monotonic() < deadline, "the worker was not restarted"
                time.sleep(0.5)
        again = ray.get(worker.rollout.remote([task], 2), timeout=120)
        assert len(again) == 2 and all(t.status in ("ok", "truncated") for t in again)
    finally:
        ray.kill(worker)


def test_lost_episodes_take_no_part_in_group_statistics():
    from forge.run.faults import lost_group
    from forge.types import Trajectory

    def played(reward: float) -> Trajectory:
        return Trajectory("t", "g", [1, 2], [0, 1], [0.0, -1.0], [-1, 0], 1, reward=reward, outcome=reward)

    group = [played(1.0), played(0.0)]
    with_lost = group + [
        Trajectory(**{**vars(t), "group_id": "g"}) for t in lost_group({"task_id": "t"}, 2, "worker died")
    ]
    assert trajectory_advantages(with_lost)[:2] == pytest.approx(trajectory_advantages(group))
    assert trajectory_advantages(with_lost)[2:] == [0.0, 0.0]
