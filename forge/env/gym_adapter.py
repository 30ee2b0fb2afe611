"""`GymEnv`: a `gymnasium.Env` as a Forge env the model can read.

Observations become text: a text space passes through; otherwise a user function
(`observation_fn`), else the env's ANSI render with its control codes stripped (a
highlighted cell becomes `[X]`), else `str(obs)`. The system prompt describes the task
and the action space. Actions: a text space takes the reply; `Discrete` takes the first
integer or action name in it; `Box` its first numbers, one per dimension, within the
bounds. Other spaces need `parse_action` (and `describe_actions`) overridden.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import numpy as np

from forge.env.base import Env, StepResult

_INTEGER = re.compile(r"-?\d+")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
_HIGHLIGHTED = re.compile(r"\x1b\[(?:4\d|10\d|7)m(.*?)\x1b\[0?m", re.S)  # a background-coloured span
_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|\x1b[@-Z\\-_]")

# What each action of a few classic gymnasium envs means (their documentation's tables).
ACTION_NAMES: dict[str, list[str]] = {
    "FrozenLake": ["left", "down", "right", "up"],
    "CliffWalking": ["up", "right", "down", "left"],
    "Taxi": ["south", "north", "east", "west", "pickup", "dropoff"],
    "Blackjack": ["stick", "hit"],
}


def strip_ansi(text: str) -> str:
    """Terminal text without its control codes; a span drawn on a coloured background (the
    agent's cell in FrozenLake or Taxi) is kept in brackets, since its colour was its meaning."""
    return _CONTROL.sub("", _HIGHLIGHTED.sub(r"[\1]", text)).strip("\n")


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

    Reward: each step's `StepResult.reward` is gymnasium's reward for that step, and the
    episode's outcome is their sum, the gymnasium return (the rule every Forge env follows;
    see `StepResult`). An episode succeeds when that return reaches
    `reward.success_threshold`, unless `info["success"]` says otherwise.

    `description` opens the system prompt (default: the env id); `action_names` name the
    actions of a `Discrete` space (default: a table for a few classic envs); and
    `observation_fn(observation, gym_env) -> str` replaces the default text form.
    """

    def __init__(
        self,
        env_id: str | None = None,
        env: gym.Env | None = None,
        description: str | None = None,
        action_names: list[str] | None = None,
        observation_fn: Callable[[Any, gym.Env], str] | None = None,
        **make_kwargs: Any,
    ) -> None:
        if (env_id is None) == (env is None):
            raise ValueError("GymEnv needs exactly one of env_id (a gymnasium id) or env (a gymnasium.Env)")
        try:
            self.gym_env = env if env is not None else self._make(env_id, observation_fn, make_kwargs)
        except gym.error.Error as exc:
            raise ValueError(f"GymEnv: gymnasium cannot make {env_id!r}: {exc}") from exc
        self.env_id = env_id or type(env).__name__
        self.observation_fn = observation_fn
        family = self.env_id.split("/")[-1].split("-")[0]
        self.action_names = action_names if action_names is not None else ACTION_NAMES.get(family)
        space = self.gym_env.action_space
        if self.action_names is not None and not (
            isinstance(space, gym.spaces.Discrete) and len(self.action_names) == space.n
        ):
            raise ValueError(
                f"GymEnv: action_names has {len(self.action_names)} names for action space {space}"
            )
        # Refused here, not on every reply: each turn would otherwise be an invalid action.
        if type(self).parse_action is GymEnv.parse_action and not isinstance(
            space, (gym.spaces.Text, gym.spaces.Discrete, gym.spaces.Box)
        ):
            raise ValueError(
                f"GymEnv: {type(space).__name__} action spaces need GymEnv.parse_action overridden "
                "(subclass GymEnv; override describe_actions too, to tell the model how to reply)"
            )
        self.system_prompt = "\n".join(
            part
            for part in (description or f"You are playing {self.env_id}.", self.describe_actions())
            if part
        )
        self.turns = 0

    @staticmethod
    def _make(env_id: str, observation_fn: Any, make_kwargs: dict[str, Any]) -> gym.Env:
        """Made with `render_mode="ansi"` when the env offers it and nothing else will
        describe its observations (a text space, `observation_fn`, a chosen render mode)."""
        made = gym.make(env_id, **make_kwargs)
        if (
            observation_fn is None
            and "render_mode" not in make_kwargs
            and not isinstance(made.observation_space, gym.spaces.Text)
            and "ansi" in made.metadata.get("render_modes", [])
        ):
            made.close()
            made = gym.make(env_id, render_mode="ansi", **make_kwargs)
        return made

    @classmethod
    def generate_tasks(cls, num_tasks: int, seed: int, env_id: str = "gym", **_: Any) -> list[dict[str, Any]]:
        return [{"task_id": f"{env_id}-{seed}-{i}", "seed": seed * 1_000_003 + i} for i in range(num_tasks)]

    def describe_actions(self) -> str:
        """The action space as the model is told it, in the system prompt."""
        space = self.gym_env.action_space
        if isinstance(space, gym.spaces.Text):
            return f"Reply with your action as text of at most {space.max_length} characters."
        if isinstance(space, gym.spaces.Discrete):
            first, last = int(space.start), int(space.start + space.n - 1)
            if self.action_names:
                named = ", ".join(f"{first + i} = {name}" for i, name in enumerate(self.action_names))
                return f"Actions: {named}. Reply with one action, its number or its name."
            return f"Reply with one integer action from {first} to {last}."
        if isinstance(space, gym.spaces.Box):
            low, high = space.low.flatten(), space.high.flatten()
            if len(set(low.tolist())) == 1 and len(set(high.tolist())) == 1:
                bounds = f"from {low[0]:g} to {high[0]:g}"
            else:
                bounds = "within " + ", ".join(f"[{a:g}, {b:g}]" for a, b in zip(low, high, strict=True))
            return f"Reply with {low.size} number{'s' if low.size > 1 else ''} {bounds}."
        return f"Action space: {space}."

    def observation_text(self, observation: Any) -> str:
        if self.observation_fn is not None:
            return str(self.observation_fn(observation, self.gym_env))
        if isinstance(observation, str):
            return observation
        if self.gym_env.render_mode == "ansi":
            rendered = self.gym_env.render()
            if isinstance(rendered, str) and rendered.strip():
                return strip_ansi(rendered)
        return str(observation)

    def parse_action(self, action: str) -> Any:
        """The gymnasium action for a reply; raise ValueError when there is none."""
        space = self.gym_env.action_space
        if isinstance(space, gym.spaces.Text):
            return action
        if isinstance(space, gym.spaces.Discrete):
            match = _INTEGER.search(action)
            if match is not None and space.contains(int(match.group())):
                return int(match.group())
            if self.action_names:
                words = re.findall(r"[a-z]+", action.lower())
                for word in words:
                    if word in self.action_names:
                        return int(space.start) + self.action_names.index(word)
            raise ValueError(self.describe_actions())
        if isinstance(space, gym.spaces.Box):
            numbers = [float(n) for n in _NUMBER.findall(action)[: int(np.prod(space.shape))]]
            if len(numbers) < int(np.prod(space.shape)):
                raise ValueError(self.describe_actions())
            value = np.asarray(numbers, dtype=space.dtype).reshape(space.shape)
            if not space.contains(value):
                raise ValueError(
                    f"{' '.join(f'{n:g}' for n in numbers)} is outside the bounds. {self.describe_actions()}"
                )
            return value
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
