"""Torch threads are configuration: each process runs at its configured count, which may
exceed Ray's CPU reservation, and a batch decodes on the thread that owns them."""

from __future__ import annotations

import asyncio
import threading

import pytest

from forge.config import ConfigError, load_config
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult

TWO_CORE_LAYOUT = [
    "train.num_cpus=1",
    "train.torch_threads=2",
    "rollout.num_workers=1",
    "rollout.num_cpus_per_worker=1",
    "rollout.torch_threads=2",
]


class ThreadRecordingEngine:
    policy_version = 0

    def __init__(self) -> None:
        self.threads: list[int] = []

    def generate(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        self.threads.append(threading.get_ident())
        return [GenerationResult([1], [-0.5], True, 0, len(r.token_ids)) for r in requests]


def batch_threads(offload: bool) -> tuple[int, list[int]]:
    engine = ThreadRecordingEngine()

    async def play() -> int:
        batching = BatchingEngine(engine, offload=offload)
        try:
            await asyncio.gather(
                *(batching.generate(GenerationRequest([2, 3], 1, f"e{i}")) for i in range(3))
            )
        finally:
            await batching.close()
        return threading.get_ident()

    loop_thread = asyncio.run(play())
    return loop_thread, engine.threads


def test_a_batch_decodes_on_the_event_loops_own_thread():
    loop_thread, threads = batch_threads(offload=False)
    assert threads and set(threads) == {loop_thread}


def test_an_offloaded_batch_decodes_off_the_event_loop():
    loop_thread, threads = batch_threads(offload=True)
    assert threads and loop_thread not in threads


def test_torch_threads_follow_the_cpu_reservation_unless_set():
    cfg = load_config(None, ["rollout.num_cpus_per_worker=0.5", "train.num_cpus=3"])
    assert (cfg.rollout.threads, cfg.train.threads) == (1, 3)
    cfg = load_config(None, TWO_CORE_LAYOUT)
    assert (cfg.rollout.threads, cfg.train.threads) == (2, 2)


def test_a_thread_count_below_one_is_refused_with_its_key():
    with pytest.raises(ConfigError, match="rollout.torch_threads"):
        load_config(None, ["rollout.torch_threads=0"])


def test_the_two_core_layout_fits_a_two_cpu_cluster(monkeypatch):
    import ray

    from forge.run.cluster import check_resources

    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})
    cfg = load_config("configs/smoke.yaml", TWO_CORE_LAYOUT)
    check_resources(cfg, cfg.rollout.num_workers)  # Ray can place both: no error


@pytest.mark.slow
def test_a_run_starts_its_trainer_and_worker_at_the_configured_threads(ray_session, tmp_path):
    import torch

    from forge.run.context import Run

    run = Run(load_config("configs/smoke.yaml", [*TWO_CORE_LAYOUT, "logging.tensorboard=false"]), tmp_path)
    try:
        actors = [run.trainer, *run.workers]
        counts = ray_session.get(
            [a.__ray_call__.remote(lambda self: torch.get_num_threads()) for a in actors]
        )
    finally:
        for actor in [run.trainer, *run.workers]:
            ray_session.kill(actor)
    assert counts == [2, 2]
