"""`BatchingEngine`: lets many concurrent episodes (asyncio tasks) share one engine:
requests that arrive together run as one batch, while episodes waiting on their env do
not hold others up.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from forge.rollout.engines.protocol import GenerationRequest, GenerationResult, InferenceEngine


class BatchingEngine:
    """Async front for an engine: concurrent `generate` calls are gathered into batches.

    A batch is launched when every registered episode is waiting, or `max_wait_s` after
    the first request arrived, so an episode stuck in a slow env step never stalls the
    others.

    A batch runs on the event loop's own thread, the one torch's threads were set up on:
    handed to asyncio.to_thread, a batch decoded about 2x slower at 2 threads (0.87 s
    against 0.36 s in the issue; 1.12 s against 0.55 s here at a load of 4). Under heavy
    oversubscription (load 18 on 2 cores) the order turned (bench/results/
    generation-threads2.json), which is why a crowded machine should run at 1 thread.
    Env calls that may block run in their own threads meanwhile. `offload=True` runs
    batches in a thread instead, for a loop that must stay responsive (the gateway's HTTP
    server).
    """

    def __init__(
        self,
        engine: InferenceEngine,
        max_batch_size: int = 256,
        max_wait_s: float = 0.005,
        offload: bool = False,
    ) -> None:
        self.engine = engine
        self.offload = offload
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_s
        self.active_episodes = 0
        self._pending: list[tuple[GenerationRequest, asyncio.Future]] = []
        self._arrived: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.generation_seconds = 0.0
        self.prefill_tokens = 0

    def register(self) -> None:
        self.active_episodes += 1

    def unregister(self) -> None:
        self.active_episodes -= 1
        if self._arrived is not None:
            self._arrived.set()

    def release(self, episode_id: str) -> None:
        release = getattr(self.engine, "release", None)  # scripted test engines keep no state
        if release is not None:
            release(episode_id)

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        return (await self.generate_many([request]))[0]

    async def generate_many(self, requests: list[GenerationRequest]) -> list[GenerationResult]:
        """Requests that arrived together (a client's batch): queued at once, so they run in
        one batch (with any others pending, up to `max_batch_size`)."""
        # A runner being stopped by `close` will not serve these requests: start another.
        if self._runner is None or self._runner.done() or self._runner.cancelling():
            self._arrived = asyncio.Event()
            self._runner = asyncio.create_task(self._run())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        self._pending.extend(zip(requests, futures, strict=True))
        self._arrived.set()
        return list(await asyncio.gather(*futures))

    async def close(self) -> None:
        """Stop the runner. Requests that arrive meanwhile (another caller's episodes, in an
        actor running overlapping rollouts) get a new runner, which `close` leaves alone."""
        runner = self._runner
        if runner is None:
            return
        runner.cancel()
        try:
            await runner
        except asyncio.CancelledError:
            pass
        if self._runner is runner:
            self._runner = None

    async def _run(self) -> None:
        assert self._arrived is not None
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not self._pending:
                continue
            await wait_for_batch(
                self._arrived,
                self.max_wait_s,
                lambda: len(self._pending) >= min(self.active_episodes, self.max_batch_size),
            )
            batch = self._pending[: self.max_batch_size]
            self._pending = self._pending[self.max_batch_size :]
            if self._pending:
                self._arrived.set()
            live = [(request, future) for request, future in batch if not future.cancelled()]
            for request, future in live:
                if request.cancel is not None and request.cancel.is_set():  # given up while queued
                    version = getattr(self.engine, "policy_version", 0)
                    future.set_result(GenerationResult([], [], False, version, 0))
            live = [(request, future) for request, future in live if not future.done()]
            if not live:
                continue
            # Rows in a fixed order, not arrival order (which depends on thread timing), so
            # the sampler hands the same tokens to the same episodes in every rerun.
            live.sort(key=lambda item: item[0].episode_id)
            started = time.perf_counter()
            try:
                requests = [request for request, _ in live]
                if self.offload:
                    results = await asyncio.to_thread(self.engine.generate, requests)
                else:
                    results = self.engine.generate(requests)
            except Exception as exc:  # surfaced to each waiting episode, which records it
                for _, future in live:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.generation_seconds += time.perf_counter() - started
            for (_, future), result in zip(live, results, strict=True):
                self.prefill_tokens += result.prefill_tokens
                if not future.done():
                    future.set_result(result)


async def wait_for_batch(arrived: asyncio.Event, max_wait_s: float, full: Callable[[], bool]) -> None:
    """Wait, woken by each arrival on `arrived`, until `full()` holds or `max_wait_s` has passed:
    the batching rule both this engine and the server router use."""
    deadline = time.monotonic() + max_wait_s
    while not full():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return
        try:
            await asyncio.wait_for(arrived.wait(), remaining)
        except TimeoutError:
            return
        arrived.clear()
