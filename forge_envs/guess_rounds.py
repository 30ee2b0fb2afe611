"""Guess-the-number over a long-tailed number of rounds: episodes from 1 to dozens of turns.

The straggler env: each task asks for `rounds` secrets found one after another, `rounds`
drawn per task with P(k) proportional to 1 / k**tail_exponent on 1..max_rounds, so most
episodes are short and a few run many times longer. Pair it with `env.latency` for slow
steps too (`configs/stragglers.yaml`).
"""

from __future__ import annotations

import random
import re
from typing import Any

from forge.env import Env, StepResult

_INTEGER = re.compile(r"-?\d+")


def rounds_weights(max_rounds: int, tail_exponent: float) -> list[float]:
    """P(rounds = k) for k = 1..max_rounds, proportional to k ** -tail_exponent."""
    raw = [k**-tail_exponent for k in range(1, max_rounds + 1)]
    return [w / sum(raw) for w in raw]


class GuessRoundsEnv(Env):
    """Find `rounds` secret integers in [0, n) in turn, each in at most `guesses_per_round`
    guesses; each reply's first integer is the guess.

    Every solved round earns 1 / rounds (so a whole episode is worth 1.0); a round that runs
    out of guesses ends the episode. Success is solving every round. Set the harness's
    `rollout.max_turns` to at least max_rounds * guesses_per_round."""

    blocking = False  # a regex and a comparison: run inline, not in a thread

    def __init__(
        self, n: int = 4, guesses_per_round: int = 3, max_rounds: int = 8, tail_exponent: float = 1.5
    ) -> None:
        if n < 2:
            raise ValueError(f"guess_rounds: n={n} must be at least 2")
        if guesses_per_round < 1 or max_rounds < 1:
            raise ValueError(
                f"guess_rounds: guesses_per_round={guesses_per_round} and max_rounds={max_rounds} must be at least 1"
            )
        self.n = n
        self.guesses_per_round = guesses_per_round
        self.secrets: list[int] = []
        self.round = 0
        self.guesses = 0
        self.turns = 0

    @classmethod
    def generate_tasks(
        cls, num_tasks: int, seed: int, n: int = 4, max_rounds: int = 8, tail_exponent: float = 1.5, **_: Any
    ) -> list[dict[str, Any]]:
        rng = random.Random(seed)
        weights = rounds_weights(max_rounds, tail_exponent)
        tasks = []
        for i in range(num_tasks):
            rounds = rng.choices(range(1, max_rounds + 1), weights)[0]
            tasks.append(
                {"task_id": f"rounds-{i}", "n": n, "secrets": [rng.randrange(n) for _ in range(rounds)]}
            )
        return tasks

    def reset(self, task: dict[str, Any], seed: int) -> str:
        self.secrets = [int(s) for s in task["secrets"]]
        if not self.secrets:
            raise ValueError(f"guess_rounds: task {task.get('task_id')!r} has no secrets")
        self.n = int(task.get("n", self.n))
        self.round = self.guesses = self.turns = 0
        return self._ask()

    def _ask(self) -> str:
        return f"guess a number from 0 to {self.n - 1}"

    def step(self, action: str) -> StepResult:
        self.turns += 1
        self.guesses += 1
        info: dict[str, Any] = {"turns": self.turns, "rounds": len(self.secrets)}
        match = _INTEGER.search(action)
        guess = int(match.group()) if match else None
        if guess == self.secrets[self.round]:
            self.round += 1
            self.guesses = 0
            info["rounds_solved"] = self.round
            reward = 1.0 / len(self.secrets)
            if self.round == len(self.secrets):
                return StepResult("correct", reward=reward, done=True, info={**info, "success": True})
            return StepResult(f"correct {self._ask()}", reward=reward, info=info)
        info["rounds_solved"] = self.round
        if self.guesses >= self.guesses_per_round:
            return StepResult(
                "the answer is " + str(self.secrets[self.round]), done=True, info={**info, "success": False}
            )
        if guess is None:
            return StepResult("invalid", info=info)
        return StepResult("higher" if guess < self.secrets[self.round] else "lower", info=info)
