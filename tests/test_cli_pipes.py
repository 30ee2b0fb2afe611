"""`forge ... | head` ends quietly: a reader that closes the pipe early stops forge with the
shell's SIGPIPE status (141) and no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("command", [["configs"], ["envs", "list"], ["train", "smoke", "--dry-run"]])
def test_a_closed_pipe_ends_forge_quietly(command):
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before forge writes: every write meets EPIPE
    try:
        done = subprocess.run([sys.executable, "-m", "forge.cli", *command], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, cwd=REPO, timeout=120)  # fmt: skip
    finally:
        os.close(write_end)
    assert done.returncode == 141, done.stderr
    assert "Traceback" not in done.stderr and "BrokenPipeError" not in done.stderr


def test_an_open_pipe_still_gets_everything():
    done = subprocess.run([sys.executable, "-m", "forge.cli", "configs"], capture_output=True, text=True,
                          cwd=REPO, timeout=120)  # fmt: skip
    assert done.returncode == 0 and "smoke" in done.stdout
