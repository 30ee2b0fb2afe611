"""Engines dropped and taken back, as the driver sees them: a failed call read as the engine
dead or stalled, and when and how a dropped engine is asked again whether it answers."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Protocol

from forge.rollout.engines.router import READMIT_FIRST_WAIT_S, READMIT_MAX_WAIT_S
from forge.rollout.engines.server_keys import NO_KEYS, ServerKeys

# How long a stalled engine actor asked again at a sync has to show it could take weights.
READMIT_PROBE_S = 2.0


class Drop(Protocol):
    """The pool's way to drop engine `url` for `reason`; `stalled`: it is alive, not dead."""

    def __call__(self, url: str, reason: str, stalled: bool = False) -> None: ...


def said(exc: BaseException) -> str:
    """An actor's error in one line: its own type and message, not Ray's wrapping traceback."""
    cause = getattr(exc, "cause", None) or exc
    lines = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {lines[-1][:200] if lines else ''}"


def await_each(refs: list[Any], timeout_s: float) -> list[BaseException | None]:
    """Wait for every call in `refs` at once, `timeout_s` in all, so that K stalled engines
    cost a sync one timeout, not K: for each, None if it returned, else its error
    (GetTimeoutError if it had not ended by then)."""
    import ray
    from ray.exceptions import GetTimeoutError

    ended, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s) if refs else ([], [])
    outcomes: list[BaseException | None] = []
    for ref in refs:
        if ref not in ended:
            outcomes.append(GetTimeoutError(f"no answer within {timeout_s:g}s (rollout.engine_timeout_s)"))
            continue
        try:
            ray.get(ref)
            outcomes.append(None)
        except Exception as exc:
            outcomes.append(exc)
    return outcomes


def drop_failed(calls: list[tuple[str, Any]], wait_s: float, what: str, lost: Drop) -> None:
    """Wait for each engine's call (url, ref), all at once within `wait_s`, and drop each
    engine whose call failed, saying `what` and why: one that died (it is replaced), one
    that did not answer in time or could not pause its generation (alive: it is asked
    again at later syncs). Any other error of an engine's own is raised."""
    from ray.exceptions import RayActorError

    for (url, _), error in zip(calls, await_each([ref for _, ref in calls], wait_s), strict=True):
        if error is None:
            continue
        if isinstance(error, RayActorError):
            lost(url, f"{what}: {type(error).__name__}")
        elif isinstance(error, TimeoutError):
            lost(url, f"{what} ({said(error)})", stalled=True)
        else:
            raise error


class ProbeSchedule:
    """When each dropped engine is next asked whether it answers again: READMIT_FIRST_WAIT_S
    after its drop, then at doubling waits up to READMIT_MAX_WAIT_S while it does not."""

    def __init__(self) -> None:
        self._next: dict[str, tuple[float, float]] = {}  # url -> (when to ask, the wait after)

    def dropped(self, url: str) -> None:
        self._next[url] = (time.monotonic() + READMIT_FIRST_WAIT_S, READMIT_FIRST_WAIT_S * 2)

    def due(self, urls: list[str], every: bool) -> list[str]:
        """Those of `urls` to ask now: all of them with `every`."""
        now = time.monotonic()
        return [url for url in urls if every or self._next.get(url, (0.0, 0.0))[0] <= now]

    def not_answered(self, url: str) -> None:
        _, wait = self._next.get(url, (0.0, READMIT_FIRST_WAIT_S))
        self._next[url] = (time.monotonic() + wait, min(wait * 2, READMIT_MAX_WAIT_S))


def servers_answer(urls: list[str], model: str, keys: ServerKeys = NO_KEYS) -> list[bool]:
    """Whether each remote server answers GET /health (PROBE_TIMEOUT_S each, all at once), asked
    with the API keys `keys` names."""
    from forge.rollout.engines.clients import make_client
    from forge.rollout.engines.remote import Sampling

    async def ask() -> list[bool]:
        clients = [make_client(url, model, Sampling(), keys=keys) for url in urls]
        try:
            return list(await asyncio.gather(*(client.healthy() for client in clients)))
        finally:
            for client in clients:
                await client.close()

    return asyncio.run(ask())


def actors_ready(actors: list[Any]) -> list[bool | None]:
    """Whether each engine actor could take weights now (within READMIT_PROBE_S, all asked at
    once); None for one that died."""
    import ray
    from ray.exceptions import RayActorError

    asks = [actor.can_take_weights.remote(READMIT_PROBE_S) for actor in actors]
    ended, _ = ray.wait(asks, num_returns=len(asks), timeout=READMIT_PROBE_S + 2.0)
    answers: list[bool | None] = []
    for ask in asks:
        try:
            answers.append(ask in ended and ray.get(ask))
        except RayActorError:
            answers.append(None)
    return answers
