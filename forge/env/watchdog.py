"""A watchdog for env calls made inline (`blocking = False`): one that runs past its time
limit is interrupted by an exception raised in its own thread.

An inline call runs on the event loop's thread, so `asyncio.wait_for` cannot time it out.
The watchdog thread raises `InlineTimeout` in the caller's thread (CPython's
`PyThreadState_SetAsyncExc`), again every `REFIRE_S` until the call is left, which
interrupts any Python code. A call stuck inside one C function (a long `time.sleep`, a
socket read) is interrupted only when that function returns: a rollout worker stuck so
ends itself (`forge.rollout.stuck`), `forge env check` fails such an env, and an env that
may block must leave `blocking` True.
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

REFIRE_S = 0.1  # a call that swallowed the exception (a bare except) gets it again


class InlineTimeout(BaseException):
    """Raised inside an inline env call that ran past its limit. A BaseException, so an
    env's `except Exception` does not swallow it."""


def raise_in(thread_id: int, exception: type[BaseException] | None) -> None:
    """Raise `exception` in the thread at its next Python instruction (None withdraws one
    still pending)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exception) if exception else ctypes.c_void_p(0)
    )


def importing(thread_id: int) -> bool:
    """Whether the thread is inside Python's import machinery. An exception raised there can
    land between its taking an import lock and the `try` that releases it: the lock stays
    held, and every later import in the process (a lazy `import datasets`, an env's `import
    numpy` in a method) waits forever. So `raise_in`'s callers wait until the import is done."""
    frame = sys._current_frames().get(thread_id)
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


class _Watchdog:
    """One thread watching every inline call in flight, one per calling thread."""

    def __init__(self) -> None:
        self.lock = threading.Condition()
        self.deadlines: dict[int, float] = {}  # calling thread id -> when to (re)fire
        self.fired: dict[int, bool] = {}
        self.thread: threading.Thread | None = None
        self.wake_at = float("inf")  # when the watchdog thread wakes next

    def add(self, thread_id: int, deadline: float) -> None:
        with self.lock:
            self.deadlines[thread_id] = deadline
            self.fired[thread_id] = False
            if self.thread is None or not self.thread.is_alive():
                self.thread = threading.Thread(target=self._watch, name="forge-inline-watchdog", daemon=True)
                self.thread.start()
            if deadline < self.wake_at:  # waking the thread per call would cost more than the call
                self.lock.notify()

    def remove(self, thread_id: int) -> None:
        """Stop watching the thread's call. An exception still pending for the thread is
        withdrawn, so it cannot land in later code."""
        with self.lock:
            self.deadlines.pop(thread_id, None)
            if self.fired.pop(thread_id, False):
                raise_in(thread_id, None)

    def _watch(self) -> None:
        with self.lock:
            while True:
                now = time.monotonic()
                for thread_id, deadline in self.deadlines.items():
                    if now >= deadline:
                        if not importing(thread_id):
                            raise_in(thread_id, InlineTimeout)
                            self.fired[thread_id] = True
                        self.deadlines[thread_id] = now + REFIRE_S
                self.wake_at = min(self.deadlines.values(), default=now + 60.0)
                self.lock.wait(max(self.wake_at - time.monotonic(), 0.001))


_WATCHDOG = _Watchdog()


def call_inline(function: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
    """`function(*args)` on this thread, interrupted by `InlineTimeout` past `timeout_s`.

    Written without a `with` block: the exception can land on any line, and the watch
    must be removed whatever line it lands on (else it would keep firing into this thread)."""
    thread_id = threading.get_ident()
    try:
        _WATCHDOG.add(thread_id, time.monotonic() + max(timeout_s, 0.0))
        return function(*args)
    finally:
        while True:
            try:
                _WATCHDOG.remove(thread_id)
                break
            except InlineTimeout:  # landed here, after the call: the call's outcome stands
                pass
