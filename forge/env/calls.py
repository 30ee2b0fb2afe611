"""Calling env methods that may be sync or async, under a timeout the harness enforces."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import threading
from typing import Any


class EnvTimeout(Exception):
    """An env method ran past the harness's step or episode time limit."""


def in_daemon_thread(function: Any, *args: Any, **kwargs: Any) -> asyncio.Future:
    """Run blocking `function` in a daemon thread of its own, as an awaitable.

    Not the loop's default executor: a call that never returns would make `asyncio.run`
    wait for it forever at shutdown, while an abandoned daemon thread does not.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller timed out and moved on
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (function(*args, **kwargs), None)
        except BaseException as exc:  # handed to the awaiting coroutine
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed while we ran
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(
        target=work, name=f"forge-env-{getattr(function, '__name__', 'call')}", daemon=True
    ).start()
    return future


async def _sync_then_await(method: Any, *args: Any) -> Any:
    result = await in_daemon_thread(method, *args)
    if inspect.isawaitable(result):
        result = await result
    return result


async def call_env(method: Any, *args: Any, timeout_s: float) -> Any:
    """Await `method(*args)` whether it is sync or async, giving up after `timeout_s`.

    A sync method runs in a thread so a slow env never blocks other episodes; if it hangs
    past the timeout the caller moves on and the thread is abandoned.
    """
    call = method(*args) if inspect.iscoroutinefunction(method) else _sync_then_await(method, *args)
    try:
        return await asyncio.wait_for(call, timeout=max(timeout_s, 0.0))
    except asyncio.TimeoutError:
        name = getattr(method, "__qualname__", repr(method))
        raise EnvTimeout(f"{name} took longer than {timeout_s:.1f}s") from None


async def step_with_timeout(env: Any, action: str, timeout_s: float) -> Any:
    return await call_env(env.step, action, timeout_s=timeout_s)


def call_sync(method: Any, *args: Any) -> Any:
    """Run a sync or async env method to completion from plain code (tests, scripts)."""
    result = method(*args)
    if inspect.isawaitable(result):
        return asyncio.run(_await(result))
    return result


async def _await(awaitable: Any) -> Any:
    return await awaitable
