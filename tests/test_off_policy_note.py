"""pg (-A x logprob, no importance ratio) on data the trainer's policy did not sample is said
at the run's start: the optimizer steps after a step's first minibatch (train.minibatches_per_step)
and async runs' stale batches train uncorrected, where TRL and verl clip every such step."""

from __future__ import annotations

import pytest

from forge.cli import main
from forge.config import load_config
from forge.train.trainer import off_policy_note


@pytest.mark.parametrize(
    "overrides",
    [
        ["train.minibatches_per_step=4"],
        ["train.mode=async"],
        ["train.mode=async", "train.minibatches_per_step=2"],
    ],
)
def test_pg_on_off_policy_data_is_noted_naming_the_fix(overrides):
    note = off_policy_note(load_config(None, overrides).train)
    assert note is not None and "train.loss=ppo_clip" in note and "train.tis_cap" in note


@pytest.mark.parametrize(
    "overrides",
    [
        [],  # one minibatch, sync: on-policy
        ["train.minibatches_per_step=4", "train.loss=ppo_clip"],
        ["train.minibatches_per_step=4", "train.tis_cap=2"],  # pg weighted by the capped ratio
        ["train.mode=async", "train.loss=cispo"],
    ],
)
def test_on_policy_or_corrected_training_is_not_noted(overrides):
    assert off_policy_note(load_config(None, overrides).train) is None


def test_the_dry_run_says_it(tmp_path, capsys):
    code = main(
        [
            "train",
            "configs/smoke.yaml",
            "train.loss=pg",
            "train.tis_cap=null",
            "--output-dir",
            str(tmp_path / "r"),
            "--dry-run",
        ]  # fmt: skip
    )
    assert code == 0 and "train.minibatches_per_step=4 with train.loss=pg" in capsys.readouterr().err
