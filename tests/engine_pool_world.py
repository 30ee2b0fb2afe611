"""What the engine-actor stall tests share: a driver's EnginePool over real engine actors and
a real trainer actor, a timed weight sync, and stalls injected into an engine actor through
`__ray_call__` (these functions run inside the actor, so the module is pickled by value)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from forge.config import Config


def pool_and_trainer(cfg: Config, model: Path, monkeypatch, test_module: ModuleType) -> Iterator[tuple]:
    """Start the pool and the trainer for `cfg`; yield (pool, trainer); shut both down.
    `test_module`'s own stall helpers travel to the actors by value too."""
    import ray
    from ray import cloudpickle

    from forge.rollout.engines import health
    from forge.rollout.engines.pool import EnginePool
    from forge.run.context import make_trainer

    monkeypatch.setattr(health, "READMIT_FIRST_WAIT_S", 0.0)
    for module in (sys.modules[__name__], test_module):
        cloudpickle.register_pickle_by_value(module)
    pool = EnginePool.start(cfg, model)
    trainer = make_trainer(cfg, model)
    try:
        yield pool, trainer
    finally:
        pool.shutdown()
        ray.kill(trainer)


def sync(pool, trainer, version: int) -> float:
    """The driver's weight sync of `version`; the seconds it took."""
    import ray

    wrapped, _ = ray.get(trainer.publish_weights.remote())
    started = time.monotonic()
    pool.sync(wrapped, version, trainer)
    return time.monotonic() - started


def versions(pool, timeout: float = 60) -> list[int]:
    import ray

    return ray.get([actor.get_policy_version.remote() for actor in pool.actors], timeout=timeout)


def stick_a_batch(engine) -> None:
    """In the engine actor: a generation batch starts and does not end (a long generation the
    engine cannot leave), so no weight update can pause it."""
    served = engine.service.served
    with served._state:
        served._running += 1


def end_the_batch(engine) -> None:
    served = engine.service.served
    with served._state:
        served._running -= 1
        served._state.notify_all()
