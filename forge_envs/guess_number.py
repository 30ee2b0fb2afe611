"""Guess-the-number: the model guesses, the env answers higher, lower or correct."""

from __future__ import annotations

import random
import re
from typing import Any

from forge.env import Env, StepResult

_INTEGER = re.compile(r"-?\d+")


class GuessNumberEnv(Env):
    """Find a secret integer in [0, n) by guessing; each reply's first integer is the guess.

    Reward is 1.0 on the correct guess. The turn budget is the harness's `max_turns`.
    """

    blocking = False  # a regex and a comparison: run inline, not in a thread

    def __init__(self, n: int = 16) -> None:
        if n < 2:
            raise ValueError(f"guess_number: n={n} must be at least 2")
        self.n = n
        self.secret = 0
        self.turns = 0

    @classmethod
    def generate_tasks(cls, num_tasks: int, seed: int, n: int = 16, **_: Any) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        return [{"task_id": f"guess-{i}", "secret": rng.randrange(n), "n": n} for i in range(num_tasks)]

    def reset(self, task: dict[str, Any], seed: int) -> str:
        self.secret = int(task["secret"])
        self.n = int(task.get("n", self.n))
        self.turns = 0
        return f"guess a number from 0 to {self.n - 1}"

    def step(self, action: str) -> StepResult:
        self.turns += 1
        match = _INTEGER.search(action)
        if match is None:
            return StepResult("invalid", info={"turns": self.turns, "valid": False})
        guess = int(match.group())
        if guess == self.secret:
            return StepResult("correct", reward=1.0, done=True, info={"turns": self.turns, "valid": True})
        hint = "higher" if guess < self.secret else "lower"
        return StepResult(hint, info={"turns": self.turns, "valid": True})
