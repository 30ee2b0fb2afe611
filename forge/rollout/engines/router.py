"""Routing a rollout worker's generation over several engine servers.

All turns of an episode, and all episodes of a group, go to one engine, so that its
prefix cache holds their shared context; a new group goes to the engine with the least
work (live episodes plus calls in flight), and among equally loaded engines to the next one
after the engine the last new group went to (a gateway whose agents play one group at a
time would otherwise send every group to the first engine, and a server taken back would
serve nothing). An engine that fails or hangs past its timeout
is dropped: its episodes end as lost (never waited on forever), one console line says so,
and the other engines carry on. A request the server aborted loses its episode only.

Between rollouts (`readmit`, never per token) a dropped engine is asked again, with backoff,
and taken back once it answers and holds the current weights: the driver delivered this
version to it (`stamp_version`'s `holders`) and, where the server can say, it says so. A
server restarted from its checkpoint holds stale weights until then, and stays out. With
every engine dropped, `readmit` waits up to the engine timeout for one, then stops the
rollout with an error naming them all.

A server can also restart between two of a worker's requests without any request failing;
it then samples its checkpoint while the worker stamps the current version. So `readmit`
first asks every live engine which weights it holds (at once, each within
VERSION_PROBE_TIMEOUT_S): one that says an older version than the driver delivered is dropped
like a failed one (and taken back after the next push). `stamp_version` drops at once a live
engine the driver's sync did not reach (not among `holders`).

Calls are batched as `BatchingEngine` batches in-process: a turn waits until every live
episode of the worker is waiting on generation (or `max_wait_s` has passed), then each
engine gets its episodes' turns in one `generate_batch` call. One HTTP call per turn cost
~8x the in-process step time on the smoke run (the worker's CPU went to httpx).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from forge.env.output import console
from forge.rollout.engines.batching import wait_for_batch
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.remote import (
    PROBE_TIMEOUT_S,
    EngineClient,
    EngineLost,
    ProtocolError,
    RequestAborted,
)


@dataclass
class _Engine:
    client: EngineClient
    alive: bool = True
    in_flight: int = 0
    episodes: set[str] = field(default_factory=set)
    lost_reason: str = ""
    pending: list[tuple[GenerationRequest, asyncio.Future]] = field(default_factory=list)
    ended: list[str] = field(default_factory=list)  # episodes to release with the next call
    next_check: float = 0.0  # monotonic time at which a dropped engine is asked again
    check_every_s: float = 0.0  # the wait after its next failed check (doubles, to READMIT_MAX_WAIT_S)


@dataclass(frozen=True)
class EngineView:
    """The driver's view of the engines, which a rollout worker's router routes by: the
    weights version last delivered, whether it is a LoRA adapter, the urls it was delivered to
    (None: every engine, as at the start), and every engine's url, those started in place
    of lost ones included. Sent at each weight sync, and to a worker Ray restarted before
    its first rollout: Ray builds it again from its creation arguments, so its router would
    start at version 0 with the engines the run started with, all live."""

    version: int = 0
    adapter: bool = False
    holders: list[str] | None = None
    urls: list[str] = field(default_factory=list)


# A dropped engine is asked again READMIT_FIRST_WAIT_S after it was dropped, then at doubling
# waits up to READMIT_MAX_WAIT_S: a dead server costs one short probe a minute at most.
READMIT_FIRST_WAIT_S = 1.0
READMIT_MAX_WAIT_S = 60.0
# With every engine dropped, how often they are asked while the rollout waits for one.
ALL_LOST_POLL_S = 1.0
# The most a live engine's answer to "which weights do you hold" may add to a rollout's start.
# A server that does not answer in time stays live: its requests' own timeout judges it (a
# server busy generating must not be dropped for a slow probe).
VERSION_PROBE_TIMEOUT_S = 2.0


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
        lost_wait_s: float = 120.0,
    ) -> None:
        if not clients:
            raise ValueError("the router needs at least one engine (rollout.servers or rollout.num_engines)")
        self.engines = [_Engine(client) for client in clients]
        self.offset = offset  # advances past each engine chosen for a new group
        self.name = name
        self.max_wait_s = max_wait_s
        self.lost_wait_s = lost_wait_s  # with every engine dropped, the wait for one
        self.version = 0  # the policy version the driver last delivered to the engines
        self.holders: set[str] | None = None  # the urls it was delivered to (None: no sync yet, all hold 0)
        self.readmitted = 0  # engines taken back after being dropped
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

    def take_view(self, view: EngineView, client_for: Callable[[str], EngineClient]) -> None:
        """Route by the driver's `view`: add the engines it names that this router lacks
        (`client_for` makes their clients), then stamp its version and holders."""
        known = {engine.client.url for engine in self.engines}
        for url in view.urls:
            if server_url(url) not in known:
                self.add(client_for(url))
        self.stamp_version(view.version, view.adapter, view.holders)

    def stamp_version(self, version: int, adapter: bool = False, holders: list[str] | None = None) -> None:
        """The driver delivered weights `version` (set between steps) to `holders` (None: to
        every engine). vLLM servers keep no Forge versions: their clients stamp `version` on
        what they return from now on. With `adapter`, that version is Forge's LoRA adapter on
        the vLLM and SGLang servers, which requests then name (the driver loaded it; without
        the name a request samples the base model)."""
        self.version = version
        self.holders = None if holders is None else {server_url(url) for url in holders}
        for index, engine in enumerate(self.engines):
            delivered = self.holders is None or engine.client.url in self.holders
            if not engine.alive and delivered:
                engine.next_check = 0.0  # it just took this version: worth asking at the next rollout
            elif engine.alive and not delivered:  # its samples would be stamped with a version it lacks
                self._drop(index, f"the driver's sync did not deliver weights version {version} to it")
        for engine in self.engines:
            kind = getattr(engine.client, "kind", "")
            if adapter and kind in ("vllm", "sglang"):
                engine.client.use_adapter(version)
            elif kind == "vllm":
                engine.client.policy_version = version

    @property
    def live(self) -> int:
        return sum(e.alive for e in self.engines)

    async def readmit(self) -> list[str]:
        """Between rollouts: drop the live engines that say they hold older weights than the
        current version (`confirm_live`); ask the dropped engines that are due (backoff) and
        take back those that answer and hold the current weights; returns their urls. With
        none alive, ask every ALL_LOST_POLL_S up to `lost_wait_s`, then raise EngineLost
        naming them all."""
        await self.confirm_live()
        back = await self._check_dropped(time.monotonic())
        if self.live:
            return back
        deadline = time.monotonic() + self.lost_wait_s
        print(
            f"forge: {self.name}: every engine is lost; waiting up to {self.lost_wait_s:g}s "
            "(rollout.engine_timeout_s) for one to answer with the current weights",
            file=console(),
            flush=True,
        )
        while not self.live:
            now = time.monotonic()
            if now >= deadline:
                reasons = "; ".join(f"{e.client.url}: {e.lost_reason}" for e in self.engines)
                raise EngineLost(
                    "every engine",
                    f"all {len(self.engines)} engines are lost and none came back with weights version "
                    f"{self.version} within {self.lost_wait_s:g}s (rollout.engine_timeout_s) ({reasons}); "
                    "restart the servers, or check rollout.servers",
                )
            await asyncio.sleep(min(ALL_LOST_POLL_S, deadline - now))
            back += await self._check_dropped(None)
        return back

    async def confirm_live(self) -> list[str]:
        """Ask every live engine which weights version it holds (at once, VERSION_PROBE_TIMEOUT_S
        each) and drop those that hold an older one than the driver delivered (restarted from
        their checkpoint since, or missed the update); returns their urls. An engine that cannot
        say, or does not answer in time, stays; one that holds a newer version is mid-sync
        (the driver stamps it next)."""
        version = self.version  # what the answers are compared with, should a stamp arrive meanwhile
        if version == 0:  # nothing is older than the checkpoint
            return []
        asked = [(i, e) for i, e in enumerate(self.engines) if e.alive and hasattr(e.client, "held_version")]
        said = await asyncio.gather(*(said_version(e.client) for _, e in asked))
        stale = []
        for (index, engine), held in zip(asked, said, strict=True):
            if held is not None and held < version and engine.alive:
                self._drop(index, f"it holds weights version {held}, not {version} (restarted?)")
                stale.append(engine.client.url)
        return stale

    async def _check_dropped(self, now: float | None) -> list[str]:
        """Probe the dropped engines due at `now` (None: all of them) at once."""
        due = [e for e in self.engines if not e.alive and (now is None or e.next_check <= now)]
        answers = await asyncio.gather(*(self._current(e) for e in due))
        back = []
        for engine, (ok, why) in zip(due, answers, strict=True):
            if engine.alive:  # taken back meanwhile by a concurrent rollout call's check
                continue
            if ok:
                engine.alive, engine.lost_reason = True, ""
                self.readmitted += 1
                back.append(engine.client.url)
                print(
                    f"forge: {self.name}: engine {engine.client.url} taken back (it answers and holds weights "
                    f"version {self.version}); {self.live} of {len(self.engines)} engines live",
                    file=console(),
                    flush=True,
                )
            else:
                engine.lost_reason = f"{engine.lost_reason.split(' [')[0]} [re-checked: {why}]"
                engine.next_check = time.monotonic() + engine.check_every_s
                engine.check_every_s = min(engine.check_every_s * 2, READMIT_MAX_WAIT_S)
        return back

    async def _current(self, engine: _Engine) -> tuple[bool, str]:
        """Whether a dropped engine may serve again, and why not."""
        client = engine.client
        if self.holders is not None and client.url not in self.holders:
            return False, f"weights version {self.version} not delivered to it yet"
        try:
            if not await client.healthy():
                # Down, or up but not ready: SGLang listens before it has warmed up and
                # answers 503 until then; vLLM listens only once its engine is up.
                return False, "GET /health did not answer 200 (down, or still starting)"
            asked = getattr(client, "held_version", None)
            held = await asked(PROBE_TIMEOUT_S) if callable(asked) else None
        except (EngineLost, ProtocolError) as exc:
            return False, str(exc)[:200]
        if held is not None and held != self.version:
            return False, f"it does not hold weights version {self.version} (restarted?)"
        return True, ""

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
        chosen = min(
            live,
            key=lambda i: (len(self.engines[i].episodes) + self.engines[i].in_flight, (i - self.offset) % n),
        )
        self.offset = chosen + 1
        return chosen

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
        engine.next_check = time.monotonic() + READMIT_FIRST_WAIT_S
        engine.check_every_s = READMIT_FIRST_WAIT_S * 2
        remaining = sum(e.alive for e in self.engines)
        print(
            f"forge: {self.name}: engine {engine.client.url} lost ({reason}); its {len(engine.episodes)} live "
            f"episodes end as lost; {remaining} of {len(self.engines)} engines remain (it is asked again "
            "between rollouts, and taken back once it holds the current weights)",
            file=console(),
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
        return {
            "engines_alive": self.live,
            "engines": len(self.engines),
            "engines_readmitted": self.readmitted,
        }


async def said_version(client: EngineClient) -> int | None:
    """The version `client`'s server says it holds, or None where it cannot say in time."""
    try:
        return await asyncio.wait_for(client.held_version(VERSION_PROBE_TIMEOUT_S), VERSION_PROBE_TIMEOUT_S)
    except (EngineLost, ProtocolError, TimeoutError):
        return None


def _group_of(request: GenerationRequest) -> str:
    """The agent loop names episodes `{group_id}/{seed}`: a group's episodes share the prefix."""
    return request.episode_id.rsplit("/", 1)[0] if "/" in request.episode_id else ""


def server_url(spec: str) -> str:
    """A `rollout.servers` entry's url, as its client names it (`vllm+http://h:p/` -> `http://h:p`)."""
    url = spec.split("+", 1)[1] if "+" in spec.split("://")[0] else spec
    return url.rstrip("/")
