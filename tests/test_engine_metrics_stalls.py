"""A gateway run's read of its engine actors' counters (`rollout.engine: server`) waits a
bounded time for an actor whose one thread is held, leaves that engine's counts out of the
step, names it on the console once, and never stops the run; once the actor answers again
its counts come back.

Real Ray actors (the tests' shared instance); the stall is injected into an engine actor
through `__ray_call__`."""

from __future__ import annotations

import sys
import time

import pytest

from forge.config import load_config
from forge.run.gateway import step_cache_metrics

WAIT_S = 1.0
# Longer than the 10 s the read waited before it raised GetTimeoutError and stopped the run.
BLOCKED_S = 12.0


def block(engine, seconds: float) -> None:
    """In the engine actor: the actor's one thread is held for `seconds` (a call stuck in it)."""
    time.sleep(seconds)


@pytest.fixture
def pool(ray_session, tmp_path, monkeypatch):
    from ray import cloudpickle

    from forge.models.loading import resolve_model_path
    from forge.rollout.engines import pool as pool_module
    from forge.rollout.engines.pool import EnginePool

    cfg = load_config(
        "configs/smoke.yaml",
        ["rollout.engine=server", "rollout.num_engines=2", "rollout.num_cpus_per_engine=0"],
    )
    monkeypatch.setattr(pool_module, "METRICS_WAIT_S", WAIT_S)
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # `block` runs inside the actor
    engines = EnginePool.start(cfg, resolve_model_path(cfg.model, tmp_path / "model", seed=0))
    try:
        yield engines
    finally:
        engines.shutdown()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_blocked_engine_actor_is_left_out_of_the_step_metrics_named_once_and_read_again_later(pool, capsys):
    import ray

    answering, blocked = pool.urls
    assert set(pool.metrics()) == {answering, blocked}
    held = pool.actors[1].__ray_call__.remote(block, BLOCKED_S)

    first = pool.metrics()  # raised GetTimeoutError (after 10 s) before
    second = pool.metrics()
    assert set(first) == set(second) == {answering}
    assert pool.live_urls == [answering, blocked]  # reading counters drops no engine: the sync decides
    console = capsys.readouterr().err
    assert console.count(f"engine {blocked} gave no metrics within {WAIT_S:g}s") == 1, console

    ray.get(held, timeout=60)
    assert set(pool.metrics()) == {answering, blocked}


def counts(hits: float, prompt: float) -> dict[str, float]:
    return {"prefix_cache_hit_tokens": hits, "prompt_tokens": prompt}


def test_a_step_counts_only_engines_read_at_both_its_ends():
    last = {"a": counts(10, 100), "b": None, "c": counts(0, 50)}  # b: not read at the last step's end
    now = {"a": counts(40, 200), "b": counts(90, 900), "d": counts(5, 10)}  # c: not read now; d: new
    assert step_cache_metrics(last, now) == {
        "prefix_cache_hit_tokens": 35.0,
        "prefix_cache_hit_rate": 35 / 110,
    }


def test_a_step_with_no_engine_read_twice_reports_no_cache_metrics():
    assert step_cache_metrics({"a": None}, {"a": counts(40, 200)}) == {}
