"""A weight sync to Forge's own engine actors (`rollout.engine: server`, the object store)
waits about one rollout.engine_timeout_s however many engines stall, not one per stalled
engine: the probe of every engine and the update of every engine are waited for at once.
An engine dropped for stalling is alive: it is not replaced, and takes the weights again at a
later sync once it answers.

Real Ray actors (the tests' shared instance) and a real trainer actor; the stalls are injected
into the engine actors through `__ray_call__`."""

from __future__ import annotations

import sys

import pytest
from engine_pool_world import (
    answers,
    end_the_batch,
    module_actors,
    pool_and_trainer,
    stick_a_batch,
    sync,
    versions,
    wait_for_file,
)

from forge.config import load_config

TIMEOUT_S = 5.0
STALLED = 3  # of 4 engines: waited one after another, a sync took STALLED x TIMEOUT_S


def block_until(engine, flag: str, limit_s: float) -> None:
    """In the engine actor: the actor's one thread is held (a call stuck in it) until file
    `flag` exists, `limit_s` at most."""
    wait_for_file(flag, limit_s)


def actor_config():
    return load_config(
        "configs/smoke.yaml",
        [
            "rollout.engine=server",
            f"rollout.num_engines={STALLED + 1}",
            "rollout.num_cpus_per_engine=0",
            "rollout.weight_sync=object_store",
            "rollout.max_engine_restarts=0",
            f"rollout.engine_timeout_s={TIMEOUT_S}",
        ],
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from forge.models.loading import resolve_model_path

    return resolve_model_path(actor_config().model, tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="module")
def actors(ray_session, model):
    yield from module_actors(actor_config(), model, sys.modules[__name__])


@pytest.fixture
def world(actors, model, monkeypatch):
    """Four engine actors, the trainer actor, and a fresh driver's pool over them."""
    return pool_and_trainer(actor_config(), model, monkeypatch, actors)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engines_stuck_in_a_generation_cost_a_sync_one_timeout_and_take_the_weights_once_it_ends(
    world, capsys
):
    pool, trainer = world
    sync(pool, trainer, 1)
    live, *stuck = pool.urls
    for actor in pool.actors[1:]:
        actor.__ray_call__.remote(stick_a_batch)

    took = sync(pool, trainer, 2)
    assert took < 2 * TIMEOUT_S, took  # one timeout for all three (3 x 5 s one after another before)
    assert pool.live_urls == [live] and pool.holders(2) == [live]
    assert pool.stalled == set(stuck) and len(pool.urls) == STALLED + 1  # alive: kept, not replaced
    console = capsys.readouterr().err
    for url in stuck:
        assert (
            f"engine {url} lost (weight update failed (TimeoutError: a generation batch was still running "
            f"after {TIMEOUT_S:g}s))"
        ) in console

    for actor in pool.actors[1:]:
        actor.__ray_call__.remote(end_the_batch)
    sync(pool, trainer, 3)
    assert pool.live_urls == pool.urls and pool.readmitted == STALLED
    assert versions(pool) == [3] * (STALLED + 1)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_engine_actors_stalled_whole_cost_a_sync_one_timeout_and_come_back_once_they_answer(
    world, capsys, tmp_path
):
    pool, trainer = world
    sync(pool, trainer, 1)
    live, *stuck = pool.urls
    stall_ends = tmp_path / "the-stall-ends"  # made once the sync is over: the stall outlasts it
    for actor in pool.actors[1:]:
        actor.__ray_call__.remote(block_until, str(stall_ends), 120.0)

    try:
        took = sync(pool, trainer, 2)
    finally:
        stall_ends.touch()
    assert took < 2 * TIMEOUT_S, took
    assert pool.live_urls == [live] and pool.stalled == set(stuck) and len(pool.urls) == STALLED + 1
    console = capsys.readouterr().err
    for url in stuck:
        assert (
            f"engine {url} lost (it does not answer (GetTimeoutError: no answer within {TIMEOUT_S:g}s"
            in console
        )

    assert all(answers(actor, 60.0) for actor in pool.actors[1:])  # their stall has passed
    sync(pool, trainer, 3)
    assert pool.live_urls == pool.urls and pool.readmitted == STALLED
    assert versions(pool) == [3] * (STALLED + 1)
