"""Closing envs like any other env call: within env.step_timeout_s, a close that raises or
hangs abandoned at the limit, warned once per kind, noted on its episode, never its failure.
A close runs where the env's other calls run: inline for `blocking = False` until a call of
its class runs past the limit there, then in threads (`forge.env.calls.call_env`)."""

from __future__ import annotations

import asyncio
from typing import Any

from forge.env.calls import call_env
from forge.env.errors import describe_env_error, error_headline, error_kind

_WARNED: set[str] = set()  # kinds of close failure this process has printed
_BACKGROUND: set[asyncio.Future] = set()  # closes nobody waits for, kept from the collector


async def close_env(env: Any, timeout_s: float) -> str | None:
    """Close `env` as `call_env` runs its calls, given up on after `timeout_s`. Returns None,
    or what went wrong (`describe_env_error`'s message and user frame lines), printed once
    per kind.

    An env with `blocking = False` closes inline, as its other calls: no thread per close
    (a worker closes a whole step's envs at once). Once a call of its class has run past the
    limit there, that class closes in daemon threads (a spinning one stopped, `ThreadCall`):
    inline, closes gathered together run one after another, each holding the event loop until
    the watchdog ends it (N limits for a group of N, every other episode stalled meanwhile)."""
    try:
        await call_env(env.close, timeout_s=timeout_s)
    except Exception as exc:  # the env's fault: its episode stands
        error = "\n".join(describe_env_error(exc, env).splitlines()[:2])
        warn_close_failure(error)
        return error
    return None


async def close_envs(envs: list[Any], timeout_s: float) -> list[str | None]:
    """Close `envs` at the same time (a hung close costs one time limit, not one each)."""
    return list(await asyncio.gather(*(close_env(env, timeout_s) for env in envs)))


def close_in_background(envs: list[Any], timeout_s: float) -> None:
    """Close `envs` without waiting (the caller is being cancelled, or must not wait)."""
    if not envs:
        return
    closing = asyncio.ensure_future(close_envs(envs, timeout_s))
    _BACKGROUND.add(closing)
    closing.add_done_callback(_BACKGROUND.discard)


def warn_close_failure(error: str) -> None:
    """Print a close failure, once per kind (exception type and user frame) per process."""
    kind = error_kind(error)
    if kind in _WARNED:
        return
    _WARNED.add(kind)
    from forge.failures import say

    say(
        f"forge: an env's close() failed; its episode is kept (each kind is printed once):\n  {error_headline(error)}"
    )
