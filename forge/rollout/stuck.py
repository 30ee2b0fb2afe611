"""The last resort against a rollout worker whose event loop is stuck (an inline env call
inside C code, which the watchdog cannot interrupt): the process ends and Ray restarts it.

A `blocking = False` env's calls run on the worker's event loop. The watchdog
(`forge.env.watchdog`) interrupts Python code, but a call inside one C function (a long
`time.sleep`, a regex that backtracks for hours, a C extension's loop holding the GIL)
cannot be interrupted by anything in the process: while the GIL is held no Python thread
runs at all. `faulthandler`'s timer is a C thread that needs no GIL: `LoopGuard` has the
loop re-arm it every second, so it fires only when the loop has not run for `limit_s`;
it then writes every thread's stack to a report file and ends the process (exit code 1).
The run reads the report (`stuck_report`) to say which env call was stuck, and where.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import os
import re
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

REARM_S = 1.0  # how often the loop re-arms the timer (each arming starts a C thread: ~60 us)


def stuck_limit_s(step_timeout_s: float, grace_s: float) -> float:
    """How long a worker's event loop may go without running before the worker is ended:
    the env's step time limit plus as long again, at least `grace_s` (env.stuck_grace_s: an
    inline call that runs over is interrupted at the step limit; a loaded machine may add
    seconds)."""
    return step_timeout_s + max(step_timeout_s, grace_s)


class LoopGuard:
    """Ends this process when the event loop it guards has not run for `limit_s` (see the
    module docstring), every thread's stack written first to a new file in `report_dir`,
    or with `report_dir` None to this process's stderr (where no other process reads a
    report: `forge eval`, a gateway run's own loop)."""

    def __init__(self, report_dir: str | Path | None, name: str, limit_s: float) -> None:
        self.report_dir = Path(report_dir) if report_dir is not None else None
        self.name = name  # the file's prefix: which worker
        self.limit_s = limit_s
        self.report: IO[str] | None = None
        self.loop: asyncio.AbstractEventLoop | None = None  # the loop guarded, None when stopped
        self.paused = False
        self._armed_at = 0.0  # time.monotonic() of the last arming

    def start(self) -> None:
        """Guard the running loop: arm the timer and keep re-arming it from that loop (a later
        call on the same loop does nothing; on another loop, that loop is guarded instead)."""
        loop = asyncio.get_running_loop()
        if loop is self.loop:
            return
        if self.report is None:
            self.report = self._open_report()
        self.loop = loop
        self._rearm(loop)

    def report_path(self) -> Path | None:
        """The file this process's stacks go to (None: stderr)."""
        # One file per process: a restarted worker must not overwrite its predecessor's report.
        return self.report_dir / f"{self.name}.{os.getpid()}.txt" if self.report_dir is not None else None

    def _open_report(self) -> IO[str]:
        path = self.report_path()
        if path is None:
            return sys.__stderr__  # the real stderr: faulthandler needs a file descriptor
        path.parent.mkdir(parents=True, exist_ok=True)
        report = open(path, "w")  # noqa: SIM115 (open for the life of the process: faulthandler writes to it)
        # The loop's thread, spelled as faulthandler spells it, so the report can pick its stack.
        report.write(
            f"{self.name} event loop thread 0x{threading.get_ident():016x}, stuck after {self.limit_s:g}s\n"
        )
        report.flush()
        return report

    def _rearm(self, loop: asyncio.AbstractEventLoop) -> None:
        if loop is not self.loop:  # stopped, or guarding another loop now
            return
        if not self.paused:
            self._arm()
        loop.call_later(REARM_S, self._rearm, loop)

    def _arm(self) -> None:
        self._armed_at = time.monotonic()
        faulthandler.dump_traceback_later(self.limit_s, exit=True, file=self.report)

    def beat(self) -> None:
        """Long work on the loop that is not an env call and shows its progress (a generation
        batch, after each decode step) re-arms the timer as the loop would, at most every
        REARM_S: a healthy batch longer than `limit_s` goes on, while one that stops moving
        (an env thread holding the GIL) still ends the process."""
        if self.loop is not None and not self.paused and time.monotonic() - self._armed_at >= REARM_S:
            self._arm()

    def stop(self) -> None:
        """Disarm until the next `start` (the loop is about to close)."""
        if self.loop is not None:
            self.loop = None
            faulthandler.cancel_dump_traceback_later()

    def close(self) -> None:
        """Stop for good: disarm and close the report file."""
        self.stop()
        if self.report is not None and self.report is not sys.__stderr__:
            self.report.close()
        self.report = None

    @contextlib.contextmanager
    def paused_for(self) -> Iterator[None]:
        """Disarm while the loop runs known long work that is not an env call (loading
        weights, building envs), so a slow but healthy worker is not ended."""
        if self.loop is None or self.paused:
            yield
            return
        self.paused = True
        faulthandler.cancel_dump_traceback_later()
        try:
            yield
        finally:
            self.paused = False
            if self.loop is not None:  # not stopped meanwhile
                self._arm()


@dataclass
class StuckReport:
    """What a guard's report says: where its process was stuck (`stuck_frame`), whether on
    the event loop's thread, for how long, the report's path, and, when the env's source
    file was known and on the stack, the env method the harness had called (`call`)."""

    where: str
    on_loop: bool
    seconds: float
    path: str
    call: str | None = None


def read_stuck_report(path: str | Path, env_file: str | None = None) -> StuckReport | None:
    """The report at `path`, or None when its guard has not fired (a live process's file,
    one that ended otherwise, or none); `env_file` as for `stuck_frame`."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return None
    if not _fired(text):
        return None
    limit = re.search(r"stuck after ([0-9.e+-]+)s", text)
    where, on_loop, call = stuck_frame(text, env_file)
    return StuckReport(where, on_loop, float(limit.group(1)) if limit else float("nan"), str(path), call)


def stuck_report(
    report_dir: str | Path, name: str, seen: set[str], env_file: str | None = None
) -> StuckReport | None:
    """The report a guard named `name` wrote before ending its process and not in `seen`
    (the paths reported already; updated), or None."""
    for path in sorted(Path(report_dir).glob(f"{name}.*.txt"), key=lambda p: p.stat().st_mtime):
        if str(path) in seen:
            continue
        report = read_stuck_report(path, env_file)
        if report is not None:
            seen.add(str(path))
            return report
    return None


def stuck_frame(report: str, env_file: str | None = None) -> tuple[str, bool, str | None]:
    """Where a report's process was stuck, as 'file:line in function', whether on the event
    loop's thread, and which env method the harness had called (None when unknown).

    With `env_file` (the env class's source file), the innermost frame in that file, on
    the loop's thread first, else on the first other thread that has one (a thread that
    held the GIL, or one waiting for it meanwhile: a dump cannot tell them apart); the
    method is that thread's outermost frame in the file. Otherwise, or when no thread is
    in that file: the innermost frame outside Forge and Python's own library on a thread
    running an env call handed to a thread, else on the loop's thread, else on another
    thread, else the loop's innermost frame."""
    found = re.search(r"event loop thread (0x[0-9a-f]+)", report)
    loop_id = found.group(1) if found else "-"
    stacks = re.split(r"\n(?=(?:Current thread|Thread) 0x)", report)
    threads = [
        (loop_id in s.split("\n", 1)[0], re.findall(r'File "(.+)", line (\d+) in (\S+)', s)) for s in stacks
    ]
    threads.sort(key=lambda thread: not thread[0])  # the loop's thread first
    if env_file is not None:
        env_path = os.path.abspath(env_file)
        for on_loop, frames in threads:
            own = [f for f in frames if os.path.abspath(f[0]) == env_path]
            if own:
                return f"{own[0][0]}:{own[0][1]} in {own[0][2]}", on_loop, own[-1][2]
    from forge.env.errors import is_harness

    # Threads inside an env call handed to a thread (`forge.env.calls`) before the loop's:
    # the loop's own frames outside Forge are a library's (Ray's, a web server's).
    handed = os.path.join("forge", "env", "calls.py")
    threads.sort(key=lambda thread: not any(f[0].endswith(handed) and f[2] == "work" for f in thread[1]))
    for on_loop, frames in threads:
        user = next((f for f in frames if not is_harness(f[0])), None)
        if user is not None:
            return f"{user[0]}:{user[1]} in {user[2]}", on_loop, None
    loop_frames = next((frames for on_loop, frames in threads if on_loop), [])
    if loop_frames:
        return f"{loop_frames[0][0]}:{loop_frames[0][1]} in {loop_frames[0][2]}", True, None
    return "an unknown place (the report holds no stack of the event loop's thread)", True, None


def _fired(report: str) -> bool:
    return "Timeout (" in report  # faulthandler's first line when its timer fires


def remove_unused_reports(report_dir: str | Path) -> None:
    """Delete the files of guards that never fired (and the folder, if that empties it)."""
    folder = Path(report_dir)
    for path in folder.glob("*.txt"):
        if not _fired(path.read_text(errors="replace")):
            path.unlink()
    if folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
