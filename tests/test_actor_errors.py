"""Ray's actor process logs a failed creation's whole traceback, which log_to_driver prints
above Forge's one `forge:` line: for Forge's own refusals (which the driver tells) it is
dropped; any other error keeps its traceback."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest

import forge.models.hub  # noqa: F401  (a subclass is known once imported, as in the actor that raised it)
import forge.sandbox.policy  # noqa: F401
from forge.actor_errors import CREATION_LOGGER, CREATION_PREFIX, known_refusal, quiet_known_creation_errors
from forge.config import ConfigError

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
    rollout worker died: <Ray's text>"). `forge train` now refuses them before Ray starts
    (tests/test_config.py); that check is switched off here to reach the actors' own refusal."""
    run = (
        "import sys, forge.models.loading as loading; loading.refuse_missing_lora_targets = lambda *a: None; "
        "from forge.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", run, "train", "smoke", "model.lora.enabled=true",
         "model.lora.target_modules=[nope]", "train.max_steps=2", "logging.progress_bar=false",
         "rollout.num_workers=1",  # each worker refuses alike: one shows its refusal's one line
         "--output-dir", str(tmp_path / "run")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "forge: model.lora.target_modules names ['nope']" in done.stderr
    assert "Traceback" not in done.stderr and 'File "' not in done.stderr, done.stderr
    assert "every episode was lost" not in done.stderr


def test_an_engine_actor_keeps_rays_log_of_its_refusal_off_the_console(tiny_checkpoint, monkeypatch):
    """The filter is installed before the engine loads the model, where LoRA targets it lacks
    are refused; before, Ray printed each engine's traceback above the driver's line."""
    from forge.config import load_config
    from forge.rollout.engines.actor import EngineActor

    logger = logging.getLogger(CREATION_LOGGER)
    monkeypatch.setattr(logger, "filters", [])  # as in a fresh actor process
    cfg = load_config("smoke", ["model.lora.enabled=true", "model.lora.target_modules=[nope]"])
    with pytest.raises(ConfigError, match="model.lora.target_modules names"):
        EngineActor(str(tiny_checkpoint), cfg, seed=0)
    assert not logger.filter(creation_record("forge.config.ConfigError: model.lora.target_modules names"))


class RefusingEngine:
    """An engine actor whose start raises `error` (the first one), or starts (the others)."""

    def __init__(self, error: Exception | None) -> None:
        if error is not None:
            raise error

    def url(self) -> str:
        return "http://127.0.0.1:1"


@pytest.mark.parametrize("error", [ConfigError("rollout.x refused"), ValueError("a bug")])
def test_the_engine_pool_says_an_engines_refusal_and_stops_the_others(ray_session, monkeypatch, error):
    """A known refusal at an engine actor's start is the driver's ConfigError (the CLI's one
    `forge:` line, exit 2); any other error stays Ray's, with its traceback. Either way the
    engines still starting are stopped, not left holding their CPUs."""
    import ray
    from ray import cloudpickle
    from ray.exceptions import RayActorError

    from forge.config import load_config
    from forge.rollout.engines import pool

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    started = []

    def start_engine(cfg, model_path, index, name):
        started.append(ray.remote(RefusingEngine).options(num_cpus=0).remote(error if index == 0 else None))
        return started[-1]

    monkeypatch.setattr(pool, "start_engine", start_engine)
    cfg = load_config("smoke", ["rollout.engine=server", "rollout.num_engines=2"])
    refusal = isinstance(error, ConfigError)
    with pytest.raises(
        ConfigError if refusal else RayActorError,
        match="^rollout.x refused$" if refusal else "ValueError: a bug",
    ):
        pool.EnginePool.start(cfg, "unused")
    # ray.kill only asks: a call sent before the kill lands may still be answered, so the
    # engine that had started is asked until it is gone (a live one answers every time).
    deadline = time.monotonic() + 30
    with pytest.raises(RayActorError):
        while time.monotonic() < deadline:
            ray.get(started[1].url.remote(), timeout=30)
            time.sleep(0.1)
