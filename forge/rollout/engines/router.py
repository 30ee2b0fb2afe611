"""Routing a rollout worker's generation over several engine servers.

All turns of an episode, and all episodes of a group, go to one engine, so that its
prefix cache holds their shared context; a new group goes to the engine with the least
work (live episodes plus calls in flight). An engine that fails or hangs past its timeout
is dropped: its episodes end as lost (never waited on forever), one console line says so,
and the other engines carry on. A request the server aborted loses its episode only.

Calls are batched as `BatchingEngine` batches in-process: a turn waits until every live
episode of the worker is waiting on generation (or `max_wait_s` has passed), then each
engine gets its episodes' turns in one `generate_batch` call. One HTTP call per turn cost
~8x the in-process step time on the smoke run (the worker's CPU went to httpx).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from forge.rollout.engines.batching import wait_for_batch
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.remote import EngineClient, EngineLost, RequestAborted


@dataclass
class _Engine:
    client: EngineClient
    alive: bool = True
    in_flight: int = 0
    episodes: set[str] = field(default_factory=set)
    lost_reason: str = ""
    pending: list[tuple[GenerationRequest, asyncio.Future]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)  # episodes to release with the next call


class Router:
    """The agent loop's engine (same calls as `BatchingEngine`) over remote engines.

    `offset` staggers the choice among equally loaded engines, so that several workers
    starting at once spread their first groups instead of all picking engine 0."""

    def __init__(
        self,
        clients: list[EngineClient],
        offset: int = 0,
        name: str = "rollout worker",
        max_wait_s: float = 0.005,
    ) -> None:
        if not clients:
            raise ValueError("the router needs at least one engine (rollout.servers or rollout.num_engines)")
        self.engines = [_Engine(client) for client in clients]
        self.offset = offset
        self.name = name
        self.max_wait_s = max_wait_s
        self.active_episodes = 0
        self.waiting = 0  # episodes whose turn is queued or in flight
        self.calls = 0  # generate_batch calls sent
        self._arrived: asyncio.Event | None = None
        self._runner: asyncio.Task | None = None
        self.generation_seconds = 0.0
        self.prefill_tokens = 0
        self._episode_engine: dict[str, int] = {}
        self._group_engine: dict[str, int] = {}
        self._group_members: dict[str, int] = {}
        self._episode_group: dict[str, str] = {}
        self._background: set[asyncio.Task] = set()

    @property
    def policy_version(self) -> int:
        return max((e.client.policy_version for e in self.engines if e.alive), default=0)

    @property
    def alive(self) -> list[str]:
        return [e.client.url for e in self.engines if e.alive]

    def add(self, client: EngineClient) -> None:
        self.engines.append(_Engine(client))

    def stamp_version(self, version: int, adapter: bool = False) -> None:
        """vLLM servers keep no Forge versions: their clients stamp `version` on what they
        return from now on (set between steps); with `adapter`, that version is Forge's LoRA
        adapter on them, which requests then name."""
        for engine in self.engines:
            if getattr(engine.client, "kind", "") == "vllm":
                if adapter:
                    engine.client.use_adapter(version)
                else:
                    engine.client.policy_version = version

    def register(self) -> None:
        self.active_episodes += 1

    def unregister(self) -> None:
        self.active_episodes -= 1
        if self._arrived is not None:  # the others may all be waiting now
            self._arrived.set()

    def _choose(self) -> int:
        live = [i for i, e in enumerate(self.engines) if e.alive]
        if not live:
            reasons = "; ".join(f"{e.client.url}: {e.lost_reason}" for e in self.engines)
            raise EngineLost("every engine", f"all {len(self.engines)} engines are lost ({reasons})")
        n = len(self.engines)
        return min(
            live,
            key=lambda i: (len(self.engines[i].episodes) + self.engines[i].in_flight, (i - self.offset) % n),
        )

    def engine_for(self, episode_id: str, group_id: str = "") -> int:
        """The engine an episode's calls go to: its own, its group's, or the least loaded."""
        index = self._episode_engine.get(episode_id) if episode_id else None
        if index is not None:
            return index
        index = self._group_engine.get(group_id) if group_id else None
        if index is None or not self.engines[index].alive:
            index = self._choose()
            if group_id:
                self._group_engine[group_id] = index
        if episode_id:
            self._episode_engine[episode_id] = index
            self.engines[index].episodes.add(episode_id)
            if group_id:
                self._episode_group[episode_id] = group_id
                self._group_members[group_id] = self._group_members.get(group_id, 0) + 1
        return index

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        index = self.engine_for(request.episode_id, request.group_id or _group_of(request))
        engine = self.engines[index]
        if not engine.alive:  # the episode's engine died between its turns: its KV went with it
            raise EngineLost(engine.client.url, f"lost earlier ({engine.lost_reason})")
        if self._runner is None or self._runner.done() or self._runner.cancelling():
            self._arrived = asyncio.Event()
            self._runner = asyncio.get_running_loop().create_task(self._run())
        future = asyncio.get_running_loop().create_future()
        engine.pending.append((request, future))
        self.waiting += 1
        self._arrived.set()
        try:
            return await future
        finally:
            self.waiting -= 1

    async def _run(self) -> None:
        """Send queued turns once every live episode waits on generation, or `max_wait_s`
        after the first was queued (an episode in a slow env step holds no one up)."""
        assert self._arrived is not None
        while True:
            await self._arrived.wait()
            self._arrived.clear()
            if not any(e.pending for e in self.engines):
                continue
            await wait_for_batch(self._arrived, self.max_wait_s, lambda: self.waiting >= self.active_episodes)
            for index, engine in enumerate(self.engines):
                batch = [(request, future) for request, future in engine.pending if not future.done()]
                engine.pending = []
                if batch:
                    self._spawn(self._send(index, batch))

    def _spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send(self, index: int, batch: list[tuple[GenerationRequest, asyncio.Future]]) -> None:
        engine = self.engines[index]
        if not engine.alive:
            exc = EngineLost(engine.client.url, f"lost earlier ({engine.lost_reason})")
            results: list[Any] = [exc] * len(batch)
        else:
            ended, engine.ended = engine.ended, []
            engine.in_flight += len(batch)
            self.calls += 1
            started = time.perf_counter()
            try:
                results = await engine.client.generate_batch([request for request, _ in batch], ended)
                self.generation_seconds += time.perf_counter() - started
            except Exception as exc:  # the whole call failed: every episode in it hears why
                results = [exc] * len(batch)
            finally:
                engine.in_flight -= len(batch)
        for (_, future), result in zip(batch, results, strict=True):
            if isinstance(result, EngineLost) and not isinstance(result, RequestAborted):
                self._drop(index, result.reason)  # an aborted request loses its episode only
            if future.done():  # the episode timed out meanwhile
                continue
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                self.prefill_tokens += result.prefill_tokens
                future.set_result(result)

    def _drop(self, index: int, reason: str) -> None:
        engine = self.engines[index]
        if not engine.alive:
            return
        engine.alive, engine.lost_reason = False, reason
        remaining = sum(e.alive for e in self.engines)
        print(
            f"forge: {self.name}: engine {engine.client.url} lost ({reason}); its {len(engine.episodes)} live "
            f"episodes end as lost; {remaining} of {len(self.engines)} engines remain",
            file=sys.stderr,
            flush=True,
        )

    def release(self, episode_id: str) -> None:
        """The episode ended: forget its engine, and tell the engine to free its KV with the
        next call to it (or at `close`; a lost engine is not asked)."""
        index = self._episode_engine.pop(episode_id, None)
        if index is None:
            return
        engine = self.engines[index]
        engine.episodes.discard(episode_id)
        group = self._episode_group.pop(episode_id, "")
        if group in self._group_members:
            self._group_members[group] -= 1
            if self._group_members[group] <= 0:
                del self._group_members[group]
                self._group_engine.pop(group, None)
        if engine.alive:
            engine.ended.append(episode_id)

    async def _release(self, engine: _Engine, episode_ids: list[str]) -> None:
        try:
            await engine.client.release(episode_ids)
        except Exception:  # a release that fails only leaves KV for the server's LRU to evict
            pass

    async def close(self) -> None:
        """Release the ended episodes not yet sent and stop the batching task (briefly: 5 s at
        most); clients stay open for the next rollout."""
        for engine in self.engines:
            ended, engine.ended = engine.ended, []
            if ended and engine.alive:
                self._spawn(self._release(engine, ended))
        if self._background:
            await asyncio.wait(list(self._background), timeout=5.0)
        runner, self._runner = self._runner, None
        if runner is not None and not runner.done():
            runner.cancel()
            try:
                await runner
            except asyncio.CancelledError:
                pass

    def stats(self) -> dict[str, Any]:
        return {"engines_alive": sum(e.alive for e in self.engines), "engines": len(self.engines)}


def _group_of(request: GenerationRequest) -> str:
    """The agent loop names episodes `{group_id}/{seed}`: a group's episodes share the prefix."""
    return request.episode_id.rsplit("/", 1)[0] if "/" in request.episode_id else ""
