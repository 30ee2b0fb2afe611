"""`GymEnv`: a `gymnasium.Env` with text observations and actions as a Forge env.

Text spaces pass straight through. Other spaces get a default text form (`str(obs)`; for a
`Discrete` action space, the first integer in the reply); override `observation_text` and
`parse_action` for anything richer.
"""

from __future__ import annotations

import json
import re
from typing import Any

import gymnasium as gym

from forge.env.base import Env, StepResult

_INTEGER = re.compile(r"-?\d+")


def _jsonable(info: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in info.items():
        try:
            json.dumps(value)
            out[str(key)] = value
        except (TypeError, ValueError):
            out[str(key)] = repr(value)
    return out


class GymEnv(Env):
    """Wrap `gymnasium.make(env_id, **make_kwargs)` (or a ready `env`).

    A task may carry `seed` (the gymnasium reset seed, so every episode of a group plays
    the same instance) and `options` (passed to `reset`). Gymnasium's `terminated` or
    `truncated` ends the episode; both are recorded in `info`.
    """

    def __init__(self, env_id: str | None = None, env: gym.Env | None = None, **make_kwargs: Any) -> None:
        if (env_id is None) == (env is None):
            raise ValueError("GymEnv needs exactly one of env_id (a gymnasium id) or env (a gymnasium.Env)")
        try:
            self.gym_env = env if env is not None else gym.make(env_id, **make_kwargs)
        except gym.error.Error as exc:
            raise ValueError(f"GymEnv: gymnasium cannot make {env_id!r}: {exc}") from exc
        self.env_id = env_id or type(env).__name__
        self.turns = 0

    @classmethod
    def generate_tasks(cls, num_tasks: int, seed: int, env_id: str = "gym", **_: Any) -> list[dict[str, Any]]:
        return [{"task_id": f"{env_id}-{seed}-{i}", "seed": seed * 1_000_003 + i} for i in range(num_tasks)]

    def observation_text(self, observation: Any) -> str:
        return observation if isinstance(observation, str) else str(observation)

    def parse_action(self, action: str) -> Any:
        """The gymnasium action for a reply; raise ValueError when there is none."""
        space = self.gym_env.action_space
        if isinstance(space, gym.spaces.Text):
            return action
        if isinstance(space, gym.spaces.Discrete):
            match = _INTEGER.search(action)
            if match is None or not space.contains(int(match.group())):
                raise ValueError(
                    f"reply with an integer action from {space.start} to {space.start + space.n - 1}"
                )
            return int(match.group())
        raise ValueError(f"{type(space).__name__} actions need GymEnv.parse_action overridden")

    def reset(self, task: dict[str, Any], seed: int) -> str:
        self.turns = 0
        observation, _ = self.gym_env.reset(seed=int(task.get("seed", seed)), options=task.get("options"))
        return self.observation_text(observation)

    def step(self, action: str) -> StepResult:
        self.turns += 1
        try:
            gym_action = self.parse_action(action)
        except ValueError as exc:
            return StepResult(f"invalid action: {exc}", 0.0, False, {"turns": self.turns, "valid": False})
        observation, reward, terminated, truncated, info = self.gym_env.step(gym_action)
        details = {**_jsonable(info), "turns": self.turns, "valid": True}
        details.update(terminated=bool(terminated), truncated=bool(truncated))
        return StepResult(
            self.observation_text(observation), float(reward), bool(terminated or truncated), details
        )

    def close(self) -> None:
        self.gym_env.close()
