"""A gateway run's read of its engine actors' counters (`rollout.engine: server`): an engine
held in a weight update (waiting for a generation batch to end) still gives its counts at
once; one whose process is stalled whole costs one bounded wait, not one per step: it is left
out of the step, named on the console once, never stops the run, and its counts come back
once it answers again.

Real Ray actors (the tests' shared instance); a generation batch is held in an engine actor
through `__ray_call__`, and a whole engine process is stopped with SIGSTOP."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

import pytest

from forge.config import load_config
from forge.run.gateway import step_cache_metrics

WAIT_S = 1.0


def hold_a_batch_until(engine, flag: str) -> None:
    """In the engine actor: a generation batch starts and runs until file `flag` exists, so a
    weight update asked for meanwhile waits for it."""
    served = engine.service.served
    with served._state:
        served._running += 1

    def end_when_flagged() -> None:
        while not os.path.exists(flag):
            time.sleep(0.05)
        with served._state:
            served._running -= 1
            served._state.notify_all()

    threading.Thread(target=end_when_flagged, daemon=True).start()


def process_id(engine) -> int:
    return os.getpid()


@pytest.fixture(scope="module")
def pool(ray_session, tmp_path_factory):
    from ray import cloudpickle

    from forge.models.loading import resolve_model_path
    from forge.rollout.engines import pool as pool_module
    from forge.rollout.engines.pool import EnginePool

    cfg = load_config(
        "configs/smoke.yaml",
        ["rollout.engine=server", "rollout.num_engines=2", "rollout.num_cpus_per_engine=0"],
    )
    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the helpers above run inside the actor
    model = resolve_model_path(cfg.model, tmp_path_factory.mktemp("model"), seed=0)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pool_module, "METRICS_WAIT_S", WAIT_S)
        engines = EnginePool.start(cfg, model)
        engines.model_path = model
        try:
            yield engines
        finally:
            engines.shutdown()


def paused(url: str) -> bool:
    """Whether the engine's generation is paused for a weight update (its HTTP server's own
    read, which never waits on the actor)."""
    import httpx

    return httpx.get(f"{url}/forge/metrics", timeout=10.0).json()["paused"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_engine_held_in_a_weight_update_gives_its_counts_at_once(pool, tmp_path, capsys):
    import ray

    answering, updating = pool.urls
    flag = tmp_path / "the-batch-ends"
    ray.get(pool.actors[1].__ray_call__.remote(hold_a_batch_until, str(flag)), timeout=60)
    update = pool.actors[1].load_weight_folder.remote(str(pool.model_path), 1, 120.0)
    try:
        deadline = time.monotonic() + 60
        while not paused(updating):  # the update has begun: it waits for the batch to end
            assert time.monotonic() < deadline, "the weight update never paused generation"
            time.sleep(0.05)
        read = pool.metrics()  # waited METRICS_WAIT_S and left the engine out before
        assert not ray.wait([update], timeout=0)[0]  # read while the update still waits
    finally:
        flag.touch()
    assert set(read) == {answering, updating}
    assert "gave no metrics" not in capsys.readouterr().err
    assert ray.get(update, timeout=60) == 1  # the update itself goes on as before
    assert set(pool.metrics()) == {answering, updating}


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_an_engine_stalled_whole_costs_one_wait_is_named_once_and_is_read_again_once_it_answers(
    pool, monkeypatch, capsys
):
    import ray

    answering, stalled = pool.urls
    assert set(pool.metrics()) == {answering, stalled}
    full_waits: list[float] = []  # the timeout of each ray.wait that ran it out (something unanswered)
    ray_wait = ray.wait

    def recording_wait(refs, *args, **kwargs):
        ended, pending = ray_wait(refs, *args, **kwargs)
        if pending:
            full_waits.append(kwargs.get("timeout"))
        return ended, pending

    pid = ray.get(pool.actors[1].__ray_call__.remote(process_id), timeout=60)
    os.kill(pid, signal.SIGSTOP)
    try:
        monkeypatch.setattr(ray, "wait", recording_wait)
        first = pool.metrics()
        waits_first = list(full_waits)
        second = pool.metrics()
        third = pool.metrics()
        monkeypatch.setattr(ray, "wait", ray_wait)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert set(first) == set(second) == set(third) == {answering}
    assert waits_first == [WAIT_S]
    assert full_waits == [WAIT_S, 0, 0]  # each later step only looks (WAIT_S each before)
    assert pool.live_urls == [answering, stalled]  # reading counters drops no engine: the sync decides
    console = capsys.readouterr().err
    assert console.count(f"engine {stalled} gave no metrics within {WAIT_S:g}s") == 1, console

    deadline = time.monotonic() + 60
    while set(pool.metrics()) != {answering, stalled}:  # its pending answer arrives
        assert time.monotonic() < deadline, "the engine's counts never came back"
        time.sleep(0.1)


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
