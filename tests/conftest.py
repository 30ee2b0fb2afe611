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
    """A random-init tiny Qwen2 + local tokenizer saved as a Hugging Face checkpoint."""
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
