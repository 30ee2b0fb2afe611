"""A gateway run's last resort against an env call stuck in C code that holds the GIL: the
run's process ends itself (exit code 1) and a small watcher process says why.

The gateway calls env methods in threads and abandons one at `env.step_timeout_s`, but a
thread inside one C function that holds the GIL (a regex backtracking for hours, a C
extension's loop) stops every thread of the process: the gateway's loop, the training
loop, the timeouts. `GatewayGuard` puts a `LoopGuard` (`forge.rollout.stuck`) on the
gateway server's event loop, so once that loop has not run for
`stuck_limit_s(env.step_timeout_s)` the process writes every thread's stack to
`OUTPUT_DIR/stuck_workers/gateway.PID.txt` and exits with code 1. That exit runs no Python
code, so the run cannot say anything itself: a watcher process, started with the guard,
waits for the run's process to end (a pipe whose only writer it holds reaches end of
file) and, if the guard's report fired, prints which env call was stuck, and where, to the
run's stderr.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import forge
from forge.rollout.stuck import (
    LoopGuard,
    StuckReport,
    read_stuck_report,
    remove_unused_reports,
    stuck_limit_s,
)

REPORT_DIR = "stuck_workers"  # the folder the rollout workers' reports go to: one place to look


class GatewayGuard:
    """Guards a `GatewayServer`'s event loop (see the module docstring); `stop` before the
    server stops. `env_file` is the env class's source file, whose frames the message names."""

    def __init__(
        self, server: Any, output: Path, env_name: str, env_file: str | None, step_timeout_s: float
    ) -> None:
        self.server = server
        self.report_dir = output.resolve() / REPORT_DIR
        self.guard = LoopGuard(self.report_dir, "gateway", stuck_limit_s(step_timeout_s))
        server.call(_start(self.guard))
        assert self.guard.report is not None
        read_end, self._alive = os.pipe()  # this process holds the only write end until it ends
        argv = [str(read_end), self.guard.report.name, env_name, env_file or "", repr(step_timeout_s)]
        # The watcher imports this Forge, wherever the run found it.
        path = os.pathsep.join([str(Path(forge.__file__).parent.parent), os.environ.get("PYTHONPATH", "")])
        self.watcher = subprocess.Popen(
            [sys.executable, "-m", "forge.run.gateway_guard", *argv],
            pass_fds=(read_end,),
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": path},
        )
        os.close(read_end)

    def stop(self) -> None:
        """Disarm the guard (on the loop, where it re-arms), let the watcher go and remove
        the report, which did not fire."""
        with contextlib.suppress(Exception):  # the loop is gone: its thread re-arms no more
            self.server.call(_stop(self.guard), timeout_s=10)
        self.guard.stop()
        if self._alive >= 0:
            os.close(self._alive)
            self._alive = -1
            try:
                self.watcher.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.watcher.kill()
        if self.guard.report is not None:
            self.guard.report.close()
        remove_unused_reports(self.report_dir)


async def _start(guard: LoopGuard) -> None:
    guard.start()


async def _stop(guard: LoopGuard) -> None:
    guard.stop()


def stuck_message(report: StuckReport, env_name: str, step_timeout_s: float) -> str:
    """What the console says when a gateway run's guard ended it (`report` is its report)."""
    limit = f"env.step_timeout_s={step_timeout_s:g}"
    stacks = f"All threads' stacks: {report.path}"
    if report.call is None:
        return (
            f"forge: the gateway run was ended (exit code 1): its event loop did not run for "
            f"{report.seconds:g}s (env {env_name}, {limit}); no thread was in the env's own file, and the "
            f"innermost frame outside Forge was {report.where}. Code that holds the GIL that long (C code "
            f"that does not release it) stops every thread of the process. {stacks}"
        )
    call = f"env call {report.call}() was stuck for {report.seconds:g}s at {report.where}"
    if report.on_loop:
        why = (
            "it ran on the gateway's event loop, which serves every agent, and did not return, so nothing "
            "else could run"
        )
    else:
        why = (
            "it ran in a thread inside C code that holds the GIL (a backtracking regex, a C extension's "
            "loop), which stops every thread of the process, so the gateway could not abandon it at its "
            "time limit"
        )
    return (
        f"forge: the gateway run was ended (exit code 1): the {call} (env {env_name}, {limit}): {why}. "
        f"Make that code finish within {limit}, or release the GIL while it runs (or run it in a "
        f"subprocess). {stacks}"
    )


def watch(argv: list[str]) -> int:
    """The watcher: wait until the run's process ends (end of file on the pipe `argv[0]`),
    then print the message if its guard's report `argv[1]` fired."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the run, which then lets go
    alive, report_path, env_name, env_file, step_timeout_s = argv
    with os.fdopen(int(alive), "rb") as pipe:
        pipe.read()
    report = read_stuck_report(report_path, env_file or None)
    if report is not None:
        print(stuck_message(report, env_name, float(step_timeout_s)), file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(watch(sys.argv[1:]))
