"""Ray's actor process logs a failed creation's whole traceback, which log_to_driver prints
above Forge's one `forge:` line: for Forge's own refusals (which the driver tells) it is
dropped; any other error keeps its traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

import forge.models.hub  # noqa: F401  (a subclass is known once imported, as in the actor that raised it)
import forge.sandbox.policy  # noqa: F401
from forge.actor_errors import CREATION_LOGGER, CREATION_PREFIX, known_refusal, quiet_known_creation_errors

REPO = Path(__file__).resolve().parent.parent


def creation_record(last_line: str) -> logging.LogRecord:
    text = (
        f"{CREATION_PREFIX}: The actor died because of an error raised in its creation task, "
        'ray::RolloutWorker.__init__()\n  File "x.py", line 1, in __init__\n    raise Something()\n'
        + last_line
    )
    return logging.LogRecord(CREATION_LOGGER, logging.ERROR, "_raylet.pyx", 1, text, None, None)


def test_a_known_forge_refusal_at_creation_is_not_logged_and_other_errors_are():
    quiet_known_creation_errors()
    quiet_known_creation_errors()  # twice: one filter
    logger = logging.getLogger(CREATION_LOGGER)
    assert sum(type(f).__name__ == "_QuietKnownErrors" for f in logger.filters) == 1
    assert not logger.filter(creation_record("forge.config.ConfigError: set model.lora.target_modules"))
    assert not logger.filter(
        creation_record("forge.models.hub.NodeHubError: trainer on node n")
    )  # a subclass
    assert not logger.filter(creation_record("forge.sandbox.policy.WorkerSandboxRefused: level 0"))
    assert logger.filter(creation_record("ValueError: something unexpected"))
    assert logger.filter(logging.LogRecord(CREATION_LOGGER, logging.ERROR, "x", 1, "other", None, None))


class FailedCreation(Exception):
    actor_init_failed = True


def test_the_driver_reads_back_the_refusal_whose_log_was_dropped():
    """What the filter drops the driver must say: the same errors, read from Ray's text."""
    text = 'ray::RolloutWorker.__init__()\n  File "x.py", line 1\n    raise X\n'
    assert known_refusal(FailedCreation(text + "forge.models.hub.NodeHubError: trainer on node n")) == (
        "trainer on node n"
    )
    assert known_refusal(FailedCreation(text + "ValueError: something unexpected")) is None
    assert known_refusal(Exception(text + "forge.config.ConfigError: x")) is None  # not a failed creation


@pytest.mark.slow
def test_forge_train_says_a_refusal_at_a_workers_start_in_one_line_without_rays_traceback(tmp_path):
    """LoRA targets the model lacks: refused in each actor's start. Before, Ray printed each
    worker's traceback and the run lost every episode of step 1 ("every episode was lost, e.g.
    rollout worker died: <Ray's text>")."""
    done = subprocess.run(
        [sys.executable, "-m", "forge.cli", "train", "smoke", "model.lora.enabled=true",
         "model.lora.target_modules=[nope]", "train.max_steps=2", "logging.progress_bar=false",
         "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "forge: model.lora.target_modules names ['nope']" in done.stderr
    assert "Traceback" not in done.stderr and 'File "' not in done.stderr, done.stderr
    assert "every episode was lost" not in done.stderr
