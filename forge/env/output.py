"""Where an env's own output goes in a run's rollout worker (logging.env_output): a log file in
the run directory, so that it does not bury Forge's messages; Forge's own lines still reach
the console through `console()`.

What goes to the file: everything written to `sys.stdout` or `sys.stderr` in the worker
process after `send_env_output_to` (print in reset/step/tools, from any thread, warnings,
logging's last-resort handler) and whatever is written to file descriptor 1 (a subprocess's
stdout, C code's printf). What does not: file descriptor 2 written directly (a subprocess's
stderr it inherits, C code's stderr, a crash dump). Descriptor 2 stays Ray's: Ray's own
worker logging and faulthandler write there, and a dying worker's last words belong on the
console. An env that wants its subprocesses' stderr in the file passes
`stderr=subprocess.STDOUT`."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TextIO

STDOUT_FD = 1

_console: TextIO | None = None  # the worker's real stderr, once env output goes to a file


def console() -> TextIO:
    """The stream for Forge's own messages: the process's real stderr even while the env's
    output goes to a file, else `sys.stderr` (looked up now, so a test's capture sees it)."""
    return _console if _console is not None else sys.stderr


def env_log_path(output_dir: Path, worker_index: int) -> Path:
    """Rollout worker `worker_index`'s env output file in a run's directory."""
    return output_dir / "env-logs" / f"worker-{worker_index}.log"


def send_env_output_to(path: Path) -> None:
    """From now on, this process's stdout and stderr (Python's streams, for every thread) and
    its descriptor 1 append to `path`; `console()` keeps the real stderr. For a process that
    plays only envs (a run's rollout worker): the swap is process-wide and never undone."""
    global _console
    path.parent.mkdir(parents=True, exist_ok=True)
    log = open(path, "a", buffering=1, encoding="utf-8", errors="replace")  # noqa: SIM115 (the process's)
    sys.stdout.flush()
    sys.stderr.flush()
    if _console is None:
        _console = sys.stderr
    os.dup2(log.fileno(), STDOUT_FD)
    sys.stdout = log
    sys.stderr = log
