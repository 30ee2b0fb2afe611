"""`rollout.weight_sync: broadcast` to Forge's own engine actors never hangs the run: an
engine that stalls during the gloo broadcast (a generation batch it cannot leave, or its
whole actor stuck) is dropped within rollout.engine_timeout_s naming it, the others take the
version at once in a new group, the trainer's next call runs, and the dropped engine takes the
weights again once it answers; with every engine stalled the run stops with exit 1.

Real Ray actors (the tests' shared instance), a real trainer actor and real gloo groups; the
stalls are injected into the engine actors through `__ray_call__`."""

from __future__ import annotations

import sys
import time

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
from forge.rollout.engines import actor_sync

TIMEOUT_S = 3.0
# The driver's grace past gloo's timeout for the sides to say how their part ended
# (actor_sync.BROADCAST_GRACE_S, 10 s in a run), shortened here: a whole stall is waited
# out 4 s sooner. The sides that failed answered 2.9-3.0 s after the driver began to wait
# (their own timeout) at load 10-17 on a 2-core machine; TIMEOUT_S + GRACE_S is 3x that.
GRACE_S = 6.0
# A stalled round ends by gloo's timeout on every side, or at the driver's grace past it; the
# rest (a group formed afresh, a broadcast of the tiny model, Ray calls) gets generous slack
# for a loaded 2-core CI machine.
SLACK_S = 15.0


def stall_the_next_group_forming(engine, flag: str, limit_s: float) -> None:
    """In the engine actor: its next join of a weight group blocks the whole actor (a
    deadlocked thread, a slow node) until file `flag` exists, `limit_s` at most, then goes on."""
    from forge.rollout.engines import broadcast

    real = broadcast.WeightGroup

    def stalled(*args, **kwargs):
        broadcast.WeightGroup = real
        wait_for_file(flag, limit_s)
        return real(*args, **kwargs)

    broadcast.WeightGroup = stalled


def broadcast_config():
    return load_config(
        "configs/smoke.yaml",
        [
            "rollout.engine=server",
            "rollout.num_engines=2",
            "rollout.num_cpus_per_engine=0",
            "rollout.weight_sync=broadcast",
            f"rollout.engine_timeout_s={TIMEOUT_S}",
        ],
    )


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from forge.models.loading import resolve_model_path

    return resolve_model_path(broadcast_config().model, tmp_path_factory.mktemp("model"), seed=0)


@pytest.fixture(scope="module")
def actors(ray_session, model):
    yield from module_actors(broadcast_config(), model, sys.modules[__name__])


@pytest.fixture
def world(actors, model, monkeypatch):
    """Two engine actors, the trainer actor, and a fresh driver's pool over them (broadcast)."""
    monkeypatch.setattr(actor_sync, "BROADCAST_GRACE_S", GRACE_S)
    return pool_and_trainer(broadcast_config(), model, monkeypatch, actors)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_engine_stuck_in_a_generation_is_dropped_from_the_broadcast_and_taken_back_once_it_ends(
    world, capsys
):
    pool, trainer = world
    a, b = pool.urls
    sync(pool, trainer, 1)
    assert versions(pool) == [1, 1]

    pool.actors[1].__ray_call__.remote(stick_a_batch)
    took = sync(pool, trainer, 2)
    assert took < TIMEOUT_S + GRACE_S + SLACK_S, took  # one stalled round, then a group without b
    assert pool.live_urls == [a] and b in pool.dead and pool.holders(2) == [a]
    assert len(pool.urls) == 2  # alive: no engine started in its place
    assert versions(pool) == [2, 1]
    assert answers(trainer)  # the trainer's next call (a training step) runs
    console = capsys.readouterr().err
    assert (
        f"engine {b} lost (it failed its part of the weight broadcast (TimeoutError: a generation batch was "
        f"still running after {TIMEOUT_S:g}s); the others take version 2 in a new broadcast group without it); "
        "1 of 2 engines remain"
    ) in console

    sync(pool, trainer, 3)  # its batch still runs: it stays out, the sync goes on without it
    assert pool.live_urls == [a] and versions(pool) == [3, 1]

    pool.actors[1].__ray_call__.remote(end_the_batch)  # the long generation ends
    sync(pool, trainer, 4)
    assert pool.live_urls == [a, b] and pool.holders(4) == [a, b] and pool.readmitted == 1
    assert versions(pool) == [4, 4]
    console = capsys.readouterr().err
    assert f"engine {b} answers again; it gets the current weights now" in console
    assert f"engine {b} took weights version 4 and serves again (2 of 2 engines live)" in console


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_engine_actor_that_stalls_whole_while_the_group_forms_is_dropped_and_the_other_takes_the_version(
    world, capsys, tmp_path
):
    pool, trainer = world
    a, b = pool.urls
    # Made once the sync is over: the stall outlasts the driver's wait, which sees no answer at all.
    stall_ends = tmp_path / "the-stall-ends"
    pool.actors[1].__ray_call__.remote(stall_the_next_group_forming, str(stall_ends), 120.0)
    try:
        took = sync(pool, trainer, 1)
    finally:
        stall_ends.touch()
    assert took < 2 * TIMEOUT_S + GRACE_S + SLACK_S, took
    assert pool.live_urls == [a] and versions(pool)[0] == 1
    assert answers(trainer)
    assert (
        f"engine {b} lost (it stalled forming the weight broadcast group: no answer within "
        f"{TIMEOUT_S + GRACE_S:g}s (rollout.engine_timeout_s)"
    ) in capsys.readouterr().err

    assert answers(pool.actors[1], 60.0)  # its stall has passed (its late join failed alone)
    sync(pool, trainer, 2)
    assert pool.live_urls == [a, b] and versions(pool) == [2, 2] and pool.readmitted == 1


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_broadcast_in_which_every_engine_stalls_stops_the_run_with_exit_1_not_a_hang(
    world, monkeypatch, capsys
):
    from forge.cli import main
    from forge.run import launch

    pool, trainer = world
    sync(pool, trainer, 1)
    for actor in pool.actors:
        actor.__ray_call__.remote(stick_a_batch)

    def train(cfg, resume: bool = False, overwrite: bool = False):
        sync(pool, trainer, 2)  # a run's next weight sync

    monkeypatch.setattr(launch, "train", train)
    started = time.monotonic()
    assert main(["train", "configs/smoke.yaml"]) == 1
    # One stalled round, then the wait of rollout.engine_timeout_s for one to answer again.
    assert time.monotonic() - started < 2 * TIMEOUT_S + GRACE_S + SLACK_S
    assert answers(trainer)
    console = capsys.readouterr().err
    assert "the others take version 2 in a new broadcast group without it); 0 of 2 engines remain" in console
    assert (
        f"forge: all 2 inference engines are lost and none answered again within "
        f"rollout.engine_timeout_s={TIMEOUT_S:g}s"
    ) in console
