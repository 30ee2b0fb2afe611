"""A rollout worker streams groups as each ends (`rollout_groups`), so async training gets
short groups without waiting for the slowest episode of the worker's call."""

from __future__ import annotations

import asyncio
import time

import pytest

from forge.config import Config
from forge.env import Env, StepResult
from forge.rollout.worker import RolloutWorker


class DelayEnv(Env):
    """Each step of task `t` takes `t["delay"]` seconds (awaited); two steps an episode."""

    async def reset(self, task, seed):
        self.delay, self.steps = float(task["delay"]), 0
        return "guess a number from 0 to 3"

    async def step(self, action):
        self.steps += 1
        await asyncio.sleep(self.delay)
        return StepResult("lower", done=self.steps == 2)


@pytest.fixture(scope="module")
def worker(tiny_checkpoint) -> RolloutWorker:
    cfg = Config()
    cfg.rollout.max_turns = 4
    made = RolloutWorker(str(tiny_checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)
    made.env_class = DelayEnv
    return made


TASKS = [
    {"task_id": "slow", "delay": 1.0},
    {"task_id": "fast", "delay": 0.0},
    {"task_id": "mid", "delay": 0.3},
]


def test_groups_arrive_as_each_ends_not_in_launch_order(worker):
    rollout = worker

    async def stream() -> list[tuple[int, str, int, float]]:
        started = time.monotonic()
        return [(index, group[0].task_id, len(group), time.monotonic() - started)
                async for index, group in rollout.rollout_groups(TASKS, 3)]  # fmt: skip

    arrived = asyncio.run(stream())
    assert [(index, task_id, size) for index, task_id, size, _ in arrived] == [
        (1, "fast", 3), (2, "mid", 3), (0, "slow", 3)
    ]  # fmt: skip
    fast_at, slow_at = arrived[0][3], arrived[-1][3]
    assert slow_at >= 2.0 and fast_at < slow_at - 1.0  # the fast group did not wait for the slow one's 2 s


def test_rollout_still_returns_every_episode_task_by_task(worker):
    episodes = asyncio.run(worker.rollout(TASKS, 2))
    assert [t.task_id for t in episodes] == ["slow", "slow", "fast", "fast", "mid", "mid"]
    assert all(t.status == "ok" and t.num_turns == 2 for t in episodes)
