"""Processes a test module starts at once and its tests wait for one by one: for tests that
each check one whole process whose time is mostly start-up and waiting on a time limit, so
on 2 cores several end in about the time of the longest alone."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path


class Started:
    """A process started now, its output going to files in `folder` (the others run meanwhile:
    nothing reads a pipe); `finish` waits for it and returns what it did."""

    def __init__(
        self, folder: Path, command: list[str], cwd: Path, env: dict[str, str] | None = None
    ) -> None:
        self.folder = folder
        self.stdout_path, self.stderr_path = folder / "stdout", folder / "stderr"
        with self.stdout_path.open("w") as stdout, self.stderr_path.open("w") as stderr:
            self.started = time.monotonic()
            self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=stdout, stderr=stderr)
        self.seconds = 0.0  # from its start to its end, once `finish` returned

    def finish(self, timeout_s: float) -> subprocess.CompletedProcess:
        """Wait for the process (at most `timeout_s` from its start): its exit code and output."""
        code = self.process.wait(timeout=max(self.started + timeout_s - time.monotonic(), 1.0))
        self.seconds = time.monotonic() - self.started
        return subprocess.CompletedProcess(
            self.process.args, code, self.stdout_path.read_text(), self.stderr_path.read_text()
        )

    def stop(self) -> None:
        """End it if it still runs (a test failed before it waited for it)."""
        self.process.kill()
        self.process.wait()


def selected_tests(request) -> set[str]:
    """The names (without parameters) of the tests of the requesting module this session runs."""
    return {item.originalname for item in request.session.items if item.module is request.module}
