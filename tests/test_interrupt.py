"""A run stopped from outside (Ctrl-C, or SIGTERM as a scheduler preempting it sends) ends in
one line saying what it kept and how to go on, with the exit code a shell expects, and its
Ray processes gone; before, Ctrl-C printed Python's traceback of wherever it landed (exit 1),
and SIGTERM aborted the driver with Ray's C++ stack dump (exit -6)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from forge.rollout.stuck_watch import RUN_MARK
from forge.train.checkpoint import LATEST, checkpoint_root

REPO = Path(__file__).resolve().parent.parent


def run_processes(driver: int) -> list[psutil.Process]:
    """The processes a run started (its local Ray's, which inherit the driver's run mark)."""
    found = []
    for process in psutil.process_iter():
        try:
            if process.environ().get(RUN_MARK, "").startswith(f"{driver}-"):
                found.append(process)
        except (psutil.Error, OSError):
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("stop", "how", "code"),
    [
        (signal.SIGTERM, "SIGTERM", 143),  # to the driver, as `kill` or a scheduler sends it
        (signal.SIGINT, "Ctrl-C", 130),  # to the whole process group, as a terminal sends Ctrl-C
    ],
)
def test_a_run_stopped_from_outside_says_what_it_kept_and_leaves_no_process(tmp_path, stop, how, code):
    output = tmp_path / "run"
    latest = checkpoint_root(output) / LATEST
    driver = subprocess.Popen(
        [sys.executable, "-m", "forge.cli", "train", "smoke", "train.max_steps=1000", "train.checkpoint_every=1",
         "rollout.tasks_per_step=2", "logging.progress_bar=false", "--output-dir", str(output)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's foreground job
        start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not latest.is_file() and time.monotonic() < deadline:
            assert driver.poll() is None, driver.communicate()
            time.sleep(0.2)
        if stop == signal.SIGINT:
            os.killpg(driver.pid, stop)
        else:
            driver.send_signal(stop)
        _, stderr = driver.communicate(timeout=60)
    finally:
        driver.kill()  # the test failed before the run ended
    assert driver.returncode == code, stderr
    lines = [line for line in stderr.splitlines() if line.startswith("forge: interrupted")]
    assert lines == [
        f"forge: interrupted ({how}), so the run stopped; its steps so far are in {output}/metrics.jsonl. "
        f"Continue from {latest.read_text().strip()} with: "
        f"forge train smoke --resume {output}"
    ], stderr
    assert "Traceback" not in stderr and "SIGTERM received" not in stderr, stderr
    deadline = time.monotonic() + 15  # the raylet ends the actors of a driver that is gone
    while run_processes(driver.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not run_processes(driver.pid)
