"""Calling env methods that may be sync or async, under a timeout the harness enforces."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import inspect
import queue
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from typing import Any

from forge.env.errors import is_harness
from forge.env.watchdog import REFIRE_S, InlineTimeout, call_inline, importing, raise_in


class EnvTimeout(Exception):
    """An env method ran past the harness's step or episode time limit. `stuck_at`: where
    the abandoned call was when it was given up on (the user's frame), when known."""

    def __init__(self, message: str, stuck_at: traceback.FrameSummary | None = None) -> None:
        super().__init__(message)
        self.stuck_at = stuck_at


class DaemonThreads:
    """Reusable daemon threads for blocking env calls.

    Not the loop's default executor: a call that never returns would make `asyncio.run`
    wait for it forever at shutdown, while an abandoned daemon thread does not. A thread
    goes back to the idle list only when its call returns, so a hung call costs one thread
    and never blocks a later call; starting a thread per call cost ~0.3 ms, a third of a
    small env's rollout CPU.
    """

    def __init__(self, max_idle: int = 64) -> None:
        self.max_idle = max_idle
        self._idle: list[queue.SimpleQueue] = []
        self._lock = threading.Lock()

    def submit(self, work: Callable[[], Callable[[], None]]) -> None:
        """Run `work` in an idle thread (a new one if none is idle). `work` returns the call
        that reports its outcome; it runs after the thread is back on the idle list, so the
        caller's next call, made once it hears, finds that thread idle instead of starting
        another."""
        with self._lock:
            inbox = self._idle.pop() if self._idle else None
        if inbox is None:
            inbox = queue.SimpleQueue()
            threading.Thread(target=self._serve, args=(inbox,), name="forge-env-call", daemon=True).start()
        inbox.put(work)

    def _serve(self, inbox: queue.SimpleQueue) -> None:
        while True:
            report = inbox.get()()
            with self._lock:
                kept = len(self._idle) < self.max_idle
                if kept:
                    self._idle.append(inbox)
            report()
            if not kept:
                return


_THREADS = DaemonThreads()

# False within `in_threads`: no env call runs inline, whatever its env's `blocking` says.
_INLINE_ALLOWED: contextvars.ContextVar[bool] = contextvars.ContextVar("forge_inline_env_calls", default=True)


# blocking = False env classes one of whose inline calls ran past its limit: from then on
# their calls run in daemon threads. Inline, the calls of a step's episodes that all hang run
# one after another on the event loop, each holding it until the watchdog ends it: a limit per
# episode, every other episode stalled, and a worker whose loop stalls that long is ended as
# stuck (`forge.rollout.stuck`) with all its episodes lost.
_SLOW_INLINE: set[type] = set()


def _inline(cls: Any) -> bool:
    """Whether sync calls of env class `cls` run inline on the loop (see `call_env`)."""
    return _INLINE_ALLOWED.get() and getattr(cls, "blocking", True) is False and cls not in _SLOW_INLINE


@contextlib.contextmanager
def in_threads() -> Iterator[None]:
    """Within this block (this task and what it awaits), `call_env` hands every sync env
    method to a thread, even an env's with `blocking = False`: for callers whose calls are
    not hot (the gateway answers an HTTP request per step) and whose event loop serves
    everyone else (a call stuck in C code inline would stall it; in a thread, it is
    abandoned at its timeout)."""
    token = _INLINE_ALLOWED.set(False)
    try:
        yield
    finally:
        _INLINE_ALLOWED.reset(token)


class Abandoned(BaseException):
    """Raised inside a daemon-thread env call the harness gave up on at its time limit, so a
    call looping in Python stops instead of taking the GIL turn by turn from every later
    call for the life of the process. A call stuck inside one C function gets it when that
    function returns. A BaseException, so an env's `except Exception` does not swallow it."""


class ThreadCall:
    """A call running in a daemon thread: where it is, and a way to stop it once given up on."""

    def __init__(self) -> None:
        self.thread: int | None = None
        self.finished = False
        self._lock = threading.Lock()

    def stuck_at(self) -> traceback.FrameSummary | None:
        """The user's frame the call is in now (None when not known or not in user code)."""
        frame = sys._current_frames().get(self.thread or -1)
        return _user_frame(traceback.extract_stack(frame)) if frame is not None else None

    def give_up(self) -> traceback.FrameSummary | None:
        """Where the call is stuck (`stuck_at`), then stop it (`abandon`): the caller moved on."""
        stuck = self.stuck_at()
        self.abandon()
        return stuck

    def abandon(self) -> None:
        """Raise `Abandoned` in the call, if it is still running; while it is importing a
        module, again every `REFIRE_S` until it is out (see `watchdog.importing`)."""
        with self._lock:
            if self.thread is None or self.finished:
                return
            if not importing(self.thread):
                raise_in(self.thread, Abandoned)
                return
        retry = threading.Timer(REFIRE_S, self.abandon)
        retry.daemon = True
        retry.start()

    def run(self, function: Any, *args: Any, **kwargs: Any) -> Any:
        self.thread = threading.get_ident()
        try:
            return function(*args, **kwargs)
        finally:
            with self._lock:  # after this, `abandon` raises nothing; one it raised just before is withdrawn
                self.finished = True
                raise_in(self.thread, None)


def in_daemon_thread(
    function: Any, *args: Any, call: ThreadCall | None = None, **kwargs: Any
) -> asyncio.Future:
    """Run blocking `function` in a daemon thread (see `DaemonThreads`), as an awaitable.
    Pass `call` to learn where it is and to stop it when the caller gives up on it."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    call = call or ThreadCall()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():  # the caller timed out and moved on
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def work() -> Callable[[], None]:
        try:
            outcome: tuple[Any, BaseException | None] = (call.run(function, *args, **kwargs), None)
        except BaseException as exc:  # handed to the awaiting coroutine (Abandoned: to nobody)
            outcome = (None, exc)

        def report() -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed while we ran
                loop.call_soon_threadsafe(settle, *outcome)

        return report

    _THREADS.submit(work)
    return future


async def _sync_then_await(method: Any, *args: Any, call: ThreadCall) -> Any:
    result = await in_daemon_thread(method, *args, call=call)
    if inspect.isawaitable(result):
        result = await result
    return result


async def call_env(method: Any, *args: Any, timeout_s: float) -> Any:
    """Await `method(*args)` whether it is sync or async, giving up after `timeout_s`.

    A sync method runs in a thread so a slow env never blocks other episodes; if it hangs
    past the timeout the caller moves on and the call is abandoned (stopped with `Abandoned`
    if it loops in Python; a thread stuck in C code stays until that code returns). A sync method of an
    env with `blocking = False` runs inline on the loop: quicker, and interrupted by a
    watchdog when it hangs (see `forge.env.watchdog`), after which its class's calls run in
    threads (`_SLOW_INLINE`). A timeout's `EnvTimeout.stuck_at`
    is where a sync call was when given up on (the user's frame), when known.
    """
    thread_call = ThreadCall()  # a sync call's thread
    owner = getattr(method, "__self__", None)
    env_class = owner if isinstance(owner, type) else type(owner)
    if inspect.iscoroutinefunction(method):
        call = method(*args)
    elif _inline(env_class):
        # The env says it never blocks: no thread hand-off (see Env.blocking), but a
        # watchdog interrupts the call if it hangs anyway.
        try:
            result = call_inline(method, *args, timeout_s=timeout_s)
        except InlineTimeout as exc:
            _SLOW_INLINE.add(env_class)
            name = getattr(method, "__qualname__", repr(method))
            raise EnvTimeout(
                f"{name} took longer than {timeout_s:.1f}s (called inline: the env sets blocking = False)",
                _user_frame(traceback.extract_tb(exc.__traceback__)),
            ) from None
        if not inspect.isawaitable(result):
            return result
        call = result
    else:
        call = _sync_then_await(method, *args, call=thread_call)
    try:
        return await asyncio.wait_for(call, timeout=max(timeout_s, 0.0))
    except TimeoutError:
        name = getattr(method, "__qualname__", repr(method))
        stuck = thread_call.give_up()
        why = " (in a thread: a call of this blocking = False env ran past its limit inline)"
        raise EnvTimeout(
            f"{name} took longer than {timeout_s:.1f}s{why if env_class in _SLOW_INLINE else ''}", stuck
        ) from None


async def build_env(
    factory: Callable[..., Any],
    kwargs: dict[str, Any] | None = None,
    *,
    timeout_s: float,
    name: str | None = None,
    limit: str = "env.step_timeout_s",
) -> Any:
    """`factory(**kwargs)` (an env class, or a function that returns an env), given up on
    after `timeout_s` with `EnvTimeout` ("building NAME took longer than ..., `limit`").

    Built where the env's plain methods run (see `call_env`): a class with `blocking =
    False` inline on the loop, under the watchdog; anything else in a daemon thread, so a
    constructor that hangs is abandoned like a call (`call_env`; an env it builds after all
    is closed) while the loop serves every other episode. `stuck_at` says where the constructor was."""
    label = name or getattr(factory, "__name__", "")
    if not label or label.startswith("<"):  # a lambda
        label = "the env"
    what = f"building {label} took longer than {timeout_s:g}s ({limit})"
    if _inline(factory):
        try:
            return call_inline(lambda: factory(**(kwargs or {})), timeout_s=timeout_s)
        except InlineTimeout as exc:
            if isinstance(factory, type):
                _SLOW_INLINE.add(factory)
            stuck = _user_frame(traceback.extract_tb(exc.__traceback__))
            raise EnvTimeout(f"{what}; built inline: {label} sets blocking = False", stuck) from None
    state: dict[str, Any] = {}
    thread_call = ThreadCall()

    def build() -> Any:
        env = factory(**(kwargs or {}))
        if state.get("abandoned"):  # nobody will use it: release what it holds
            with contextlib.suppress(Exception):
                closed = env.close()
                if inspect.isawaitable(closed):
                    closed.close()
        return env

    try:
        return await asyncio.wait_for(in_daemon_thread(build, call=thread_call), timeout=max(timeout_s, 0.0))
    except TimeoutError:
        state["abandoned"] = True
        stuck = thread_call.give_up()
        if factory in _SLOW_INLINE:
            what += f"; built in a thread: a call of {label} (blocking = False) ran past its limit inline"
        raise EnvTimeout(what, stuck) from None
    except asyncio.CancelledError:
        state["abandoned"] = True
        raise


def _user_frame(frames: traceback.StackSummary) -> traceback.FrameSummary | None:
    outside = [frame for frame in frames if not is_harness(frame.filename)]
    return outside[-1] if outside else None


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
