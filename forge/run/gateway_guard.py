"""A gateway run's last resort against an env call stuck in C code that holds the GIL: the
run's process ends itself (exit code 1) and a watcher process says which call and where.

The gateway calls env methods in threads and abandons one at `env.step_timeout_s`, but a
thread inside one C function that holds the GIL (a regex backtracking for hours, a C
extension's loop) stops every thread of the process: the gateway's loop, the training
loop, the timeouts. `GatewayGuard` puts a `LoopGuard` (`forge.rollout.stuck`) on the
gateway server's event loop, so once that loop has not run for
`stuck_limit_s(env.step_timeout_s, env.stuck_grace_s)` the process writes every thread's stack to
`OUTPUT_DIR/stuck_workers/gateway.PID.txt` and exits with code 1; a `StuckWatcher`
(`forge.rollout.stuck_watch`) then prints what was stuck to the run's stderr.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from forge.rollout.stuck import LoopGuard, remove_unused_reports, stuck_limit_s
from forge.rollout.stuck_watch import StuckWatcher

REPORT_DIR = "stuck_workers"  # the folder the rollout workers' reports go to: one place to look
ON_LOOP = "it ran on the gateway's event loop, which serves every agent, and did not return, so nothing else could run"


class GatewayGuard:
    """Guards a `GatewayServer`'s event loop (see the module docstring); `stop` before the
    server stops. `env_file` is the env class's source file, whose frames the message names."""

    def __init__(
        self,
        server: Any,
        output: Path,
        env_name: str,
        env_file: str | None,
        step_timeout_s: float,
        stuck_grace_s: float,
    ) -> None:
        self.server = server
        self.report_dir = output.resolve() / REPORT_DIR
        self.guard = LoopGuard(self.report_dir, "gateway", stuck_limit_s(step_timeout_s, stuck_grace_s))
        server.call(_start(self.guard))
        try:
            self.watcher = StuckWatcher(
                self.guard.report_path(), env_name, env_file, step_timeout_s, "the gateway run", ON_LOOP
            )
        except BaseException:
            self.watcher = None
            self.stop()
            raise

    def stop(self) -> None:
        """Disarm the guard (on the loop, where it re-arms), let the watcher go and remove
        the report, which did not fire."""
        with contextlib.suppress(Exception):  # the loop is gone: its thread re-arms no more
            self.server.call(_stop(self.guard), timeout_s=10)
        self.guard.stop()
        if self.watcher is not None:
            self.watcher.close()
        self.guard.close()
        remove_unused_reports(self.report_dir)


async def _start(guard: LoopGuard) -> None:
    guard.start()


async def _stop(guard: LoopGuard) -> None:
    guard.stop()
