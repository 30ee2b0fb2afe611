"""The tasks a run plays: the env's task rows, cycled in a seeded order, split across workers."""

from __future__ import annotations

import random
from typing import Any

from forge.config import Config


class TaskStream:
    """Cycles through the task rows in a seeded shuffled order, epoch after epoch."""

    def __init__(self, tasks: list[dict[str, Any]], seed: int) -> None:
        if not tasks:
            raise ValueError("the env produced no tasks; check env.tasks or env.num_tasks")
        self.tasks = tasks
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.position = 0
        # Tasks an async run had started but not trained on when it checkpointed: a resumed
        # run plays them first.
        self.requeued: list[dict[str, Any]] = []

    def take(self, count: int) -> list[dict[str, Any]]:
        taken = self.requeued[:count]
        del self.requeued[:count]
        while len(taken) < count:
            if self.position >= len(self.order):
                self.order = list(range(len(self.tasks)))
                self.rng.shuffle(self.order)
                self.position = 0
            taken.append(self.tasks[self.order[self.position]])
            self.position += 1
        return taken


def split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    """Contiguous near-equal chunks (whole tasks per worker, so groups stay on one worker)."""
    base, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for index in range(parts):
        size = base + (1 if index < extra else 0)
        chunks.append(items[start : start + size])
        start += size
    return chunks


def load_task_rows(cfg: Config) -> list[dict[str, Any]]:
    """The configured env's task rows (`env.tasks`, or its built-in `env.num_tasks`)."""
    from forge.env.registry import resolve_env
    from forge.env.tasks import load_tasks

    env_class = resolve_env(cfg.env.name)
    dataset = load_tasks(env_class, cfg.env.tasks, cfg.env.num_tasks, cfg.seed, **cfg.env.kwargs)
    return [dict(row) for row in dataset]
