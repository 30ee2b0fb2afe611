"""Shared fixtures: one local Ray instance per test session, one tiny checkpoint."""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

# CI replays the same examples every run, so a red CI is a real regression, not a new draw.
settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs actors."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init tiny Llama (the default architecture) + local tokenizer saved as a Hugging Face checkpoint."""
    from forge.config import TinyModelConfig
    from forge.models.tiny import save_tiny_checkpoint

    return save_tiny_checkpoint(TinyModelConfig(), tmp_path_factory.mktemp("tiny_model"), seed=0)


def pytest_runtest_logreport(report):
    """On CI, name a failed test the moment it fails (with its time), not only in the final
    summary: a run that is cut off at CI's time limit still says what failed."""
    if os.environ.get("CI") and report.failed:
        import sys

        print(
            f"\nFAILED {report.nodeid} ({report.when}, {report.duration:.1f}s)", file=sys.stderr, flush=True
        )


@pytest.fixture(autouse=True, scope="module")
def no_thread_left_spinning():
    """After each test module: no thread it left behind still runs test code on a CPU. A
    spinning leftover takes the GIL turn by turn from every later test in the process (one
    made the suite ~5x slower and its timed tests fail); one asleep costs nothing."""
    yield
    import sys
    import threading
    import time
    import traceback
    from pathlib import Path

    here = str(Path(__file__).parent)

    def cpu_seconds(native_id: int) -> float:
        try:
            fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended, or not Linux
            return 0.0
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime

    frames = sys._current_frames()
    suspects = [
        t for t in threading.enumerate()
        if t is not threading.current_thread() and t.native_id and t.ident in frames
        and any(f.filename.startswith(here) for f in traceback.extract_stack(frames[t.ident]))
    ]  # fmt: skip
    if not suspects:
        return
    before = {t.native_id: cpu_seconds(t.native_id) for t in suspects}
    time.sleep(0.3)
    frames = sys._current_frames()
    spinning = [
        f"{t.name} at {traceback.extract_stack(frames[t.ident])[-1].filename}:"
        f"{traceback.extract_stack(frames[t.ident])[-1].lineno}"
        for t in suspects
        if t.ident in frames and cpu_seconds(t.native_id) - before[t.native_id] > 0.15
    ]
    assert not spinning, f"threads left running test code on a CPU: {spinning}"
