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


STOPS = [
    (signal.SIGTERM, "SIGTERM", 143),  # to the driver, as `kill` or a scheduler sends it
    (signal.SIGINT, "Ctrl-C", 130),  # to the whole process group, as a terminal sends Ctrl-C
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run per way of stopping, all started at once: most of a run's time to its first
    checkpoint is process and Ray start-up, which overlaps well on 2 cores (two runs side by
    side reached it in ~38 s, one alone in ~32 s)."""
    started = {}
    for stop, _, _ in STOPS:
        folder = tmp_path_factory.mktemp(f"interrupt-{stop.name}")
        output, stderr = folder / "run", folder / "stderr"
        # A file, not a pipe: the run stopped second writes on while the first is checked.
        with stderr.open("w") as stderr_file:
            driver = subprocess.Popen(
                [sys.executable, "-m", "forge.cli", "train", "smoke", "train.max_steps=1000",
                 "train.checkpoint_every=1", "rollout.tasks_per_step=2", "rollout.num_workers=1",
                 "logging.progress_bar=false", "--output-dir", str(output)],
                stdout=subprocess.DEVNULL, stderr=stderr_file, cwd=REPO,
                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's foreground job
                start_new_session=True,
            )  # fmt: skip
        started[stop] = output, stderr, driver
    yield started
    for _, _, driver in started.values():
        driver.kill()  # a test failed before its run ended
        driver.wait()


@pytest.mark.slow
@pytest.mark.parametrize(("stop", "how", "code"), STOPS)
def test_a_run_stopped_from_outside_says_what_it_kept_and_leaves_no_process(runs, stop, how, code):
    output, stderr_file, driver = runs[stop]
    latest = checkpoint_root(output) / LATEST
    deadline = time.monotonic() + 240
    while not latest.is_file() and time.monotonic() < deadline:
        assert driver.poll() is None, stderr_file.read_text()
        time.sleep(0.2)
    if stop == signal.SIGINT:
        os.killpg(driver.pid, stop)
    else:
        driver.send_signal(stop)
    driver.wait(timeout=60)
    stderr = stderr_file.read_text()
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
