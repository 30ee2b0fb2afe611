"""What the env-fault tests share: where a marked line of a test env is, a gateway
`EpisodeStore` that keeps its finished episodes, and a rollout worker on a tiny run."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType
from typing import Any

from forge.config import Config


def marked_line(module: ModuleType, marker: str) -> str:
    """'file:line' of the line of `module` marked `# <marker>`: what an error names."""
    source = Path(module.__file__).read_text().splitlines()
    return f"{module.__file__}:{next(i for i, text in enumerate(source, 1) if f'# {marker}' in text)}"


def episode_store(factory: Any, **options: Any) -> tuple[Any, list]:
    """An `EpisodeStore` of `factory`'s envs with a 0.3 s limit, and the list its finished
    episodes are appended to."""
    from forge.gateway.episodes import EpisodeStore

    finished: list = []
    return EpisodeStore(factory, step_timeout_s=0.3, on_finished=finished.append, **options), finished


def rollout_worker(checkpoint: Any, env_name: str, kwargs: dict, step_timeout_s: float) -> Any:
    """A `RolloutWorker` of `env_name` playing 2-turn, 2-token episodes."""
    from forge.rollout.worker import RolloutWorker

    cfg = Config()
    cfg.env.name = env_name
    cfg.env.kwargs = kwargs
    cfg.env.step_timeout_s = step_timeout_s
    cfg.rollout.max_turns = 2
    cfg.rollout.max_new_tokens = 2
    return RolloutWorker(str(checkpoint), cfg.model, cfg.env, cfg.rollout, 0.5, seed=0)


class LoopTicker:
    """Counts how often the running event loop got to run a 50 ms tick while a test awaited
    something: the gateway's loop serves every agent, so it must go on meanwhile."""

    def __init__(self) -> None:
        self.ticks = 0
        self._task: Any = None

    async def _tick(self) -> None:
        import asyncio

        while True:
            await asyncio.sleep(0.05)
            self.ticks += 1

    def start(self) -> LoopTicker:
        import asyncio

        self._task = asyncio.ensure_future(self._tick())
        return self

    def stop(self) -> None:
        self._task.cancel()
