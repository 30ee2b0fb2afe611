"""What the engine-actor stall tests share: a fresh driver's EnginePool per test over real
engine actors and a real trainer actor that a test module starts once, a timed weight sync,
and stalls injected into an engine actor through `__ray_call__` (these functions run inside
the actor, so the module is pickled by value)."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

from forge.config import Config


def module_actors(cfg: Config, model: Path, test_module: ModuleType) -> Iterator[dict]:
    """A test module's engine actors and trainer actor, started by its first test and shared
    by the rest (`pool_and_trainer`): starting them took 10-40 s a test on a loaded 2-core
    machine, most of each test's time. Yields their holder; stops them at the module's end.
    `test_module`'s own stall helpers travel to the actors by value too."""
    from ray import cloudpickle

    for module in (sys.modules[__name__], test_module):
        cloudpickle.register_pickle_by_value(module)
    actors: dict = {}
    try:
        yield actors
    finally:
        if actors:
            _stop(actors)


def pool_and_trainer(cfg: Config, model: Path, monkeypatch, actors: dict) -> tuple:
    """A fresh driver's EnginePool over the module's engine actors (`module_actors`: no engine
    dropped, nothing taken back, no broadcast group yet) and the trainer actor, as a run
    starts them. The actors are started first if none are, or again if the last test left
    one that does not answer or cannot take weights (a stall it injected outlived it)."""
    from forge.rollout.engines import health
    from forge.rollout.engines.pool import EnginePool
    from forge.run.context import make_trainer

    monkeypatch.setattr(health, "READMIT_FIRST_WAIT_S", 0.0)
    if actors and not _all_ready(actors):
        _stop(actors)
    if not actors:
        # The trainer loads while the engines do (EnginePool.start waits for them): started
        # after them, it loaded with one of the two cores idle.
        trainer = make_trainer(cfg, model)
        try:
            started = EnginePool.start(cfg, model)
        except BaseException:
            import ray

            ray.kill(trainer)
            raise
        actors.update(first=started, trainer=trainer)
    first = actors["first"]
    return EnginePool(list(first.urls), list(first.actors), cfg, model), actors["trainer"]


def _all_ready(actors: dict) -> bool:
    """Whether every engine actor could take weights now and the trainer answers."""
    import ray

    asks = [actor.can_take_weights.remote(1.0) for actor in actors["first"].actors]
    asks.append(actors["trainer"].__ray_call__.remote(lambda _: True))
    try:
        return all(ray.get(asks, timeout=20))
    except Exception:  # stalled past the wait, or dead
        return False


def _stop(actors: dict) -> None:
    import ray

    actors["first"].shutdown()
    ray.kill(actors["trainer"])
    actors.clear()


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


def answers(actor, seconds: float = 10.0) -> bool:
    """Whether a Ray actor runs a call made now within `seconds` (none is stuck ahead of it)."""
    import ray
    from ray.exceptions import GetTimeoutError

    try:
        return ray.get(actor.__ray_call__.remote(lambda _: True), timeout=seconds)
    except GetTimeoutError:
        return False


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


def wait_for_file(flag: str, limit_s: float) -> None:
    """Hold the calling thread (in an engine actor: a stall) until file `flag` exists, made by
    the test once what the stall must outlast is over; `limit_s` at most."""
    deadline = time.monotonic() + limit_s
    while not os.path.exists(flag) and time.monotonic() < deadline:
        time.sleep(0.05)
