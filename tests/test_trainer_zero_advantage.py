"""Samples with advantage exactly 0 are left out of the forward and backward: the step's
gradient and loss are those of training on every sample, at less compute."""

from __future__ import annotations

import pytest
import torch
from step_gradient import step_gradient, two_groups

from forge.config import Config
from forge.train.losses import LOSSES, VANISH_AT_ZERO_ADVANTAGE, register_loss
from forge.train.trainer import Trainer
from forge.types import Sample


def batch() -> list[Sample]:
    """Two groups of 4 that share a prompt: one all-equal (advantage 0), one spread."""
    return two_groups(lambda group, member: 0.0 if group == 0 else member - 1.5)


def step(tiny_checkpoint, **train) -> tuple[dict, torch.Tensor]:
    """One train step's metrics and the (clipped) gradient it steps with (`step_gradient`)."""
    cfg = Config()
    cfg.train.minibatches_per_step = 1
    for key, value in train.items():
        setattr(cfg.train, key, value)
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    return step_gradient(trainer, batch())


@pytest.mark.parametrize("loss", ["pg", "ppo_clip", "cispo", "gspo"])
def test_skipping_zero_advantage_samples_keeps_the_gradient_and_the_loss(tiny_checkpoint, loss):
    aggregation = "seq_mean_token_mean" if loss == "gspo" else "token_mean"
    full, full_grad = step(
        tiny_checkpoint, loss=loss, loss_aggregation=aggregation, skip_zero_advantage=False
    )
    skip, skip_grad = step(tiny_checkpoint, loss=loss, loss_aggregation=aggregation)
    assert full["zero_advantage_skipped"] == 0.0 and skip["zero_advantage_skipped"] == 0.5
    assert skip["trained_samples"] == full["trained_samples"] / 2  # the skipped half is not trained
    assert skip["tokens_computed"] == full["tokens_computed"] - 10 - 4 * 6  # one prompt, four responses
    assert skip["loss"] == pytest.approx(full["loss"], abs=1e-7)
    assert skip["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-6)
    assert ((skip_grad - full_grad).norm() / full_grad.norm()).item() <= 1e-6


@pytest.mark.parametrize(
    "train",
    [
        {"kl_coef": 0.1},  # the KL term has a gradient at advantage 0
        {"entropy_coef": 0.01},  # so has the entropy bonus
        {"skip_zero_advantage": False},
        {"loss": "advantage_free_test_loss"},  # a loss that does not declare it vanishes
    ],
)
def test_no_sample_is_skipped_where_that_would_change_the_gradient(tiny_checkpoint, train):
    if "advantage_free_test_loss" not in LOSSES:

        @register_loss("advantage_free_test_loss")
        def advantage_free(logprobs, behaviour_logprobs, advantages, loss_mask, config, ref_logprobs=None):
            return -logprobs * loss_mask, {}

    assert "advantage_free_test_loss" not in VANISH_AT_ZERO_ADVANTAGE
    metrics, _ = step(tiny_checkpoint, **train)
    assert metrics["zero_advantage_skipped"] == 0.0


def test_loss_metrics_average_over_the_optimizer_steps_that_trained_something(tiny_checkpoint):
    # Two optimizer steps; the one sample with an advantage sits in one of them, and the
    # other step, all skipped, reports no loss metrics: they are that one step's, not halved.
    samples = batch()[3:7]  # advantages 0, -1.5, -0.5, 0.5: keep one non-zero
    samples = [samples[0], samples[1]] + [Sample(s.token_ids, s.loss_mask, s.behaviour_logprobs,
                                                 s.policy_versions, 0.0) for s in samples[2:]]  # fmt: skip

    def train(batch_samples, parts):
        cfg = Config()
        cfg.train.minibatches_per_step = parts
        trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
        return trainer.train_step(batch_samples)

    both = train(samples, parts=2)
    alone = train([samples[1]], parts=1)
    assert both["zero_advantage_skipped"] == pytest.approx(0.75)
    assert both["mismatch_kl"] == pytest.approx(alone["mismatch_kl"], rel=1e-5)
    assert both["mismatch_kl"] > 0


def test_a_step_that_skips_every_sample_reports_no_tree_ratio_and_no_loss_metrics(tiny_checkpoint):
    cfg = Config()
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    metrics = trainer.train_step(batch()[:4])  # the all-equal group
    assert metrics["zero_advantage_skipped"] == 1.0 and metrics["tokens_computed"] == 0.0
    assert metrics["trained_samples"] == 0.0 and metrics["loss"] == 0.0 and metrics["grad_norm"] == 0.0
    assert metrics["optimizer_steps_skipped"] == 1.0  # nothing to step on, as before the skip
    assert "tree_token_ratio" not in metrics and "mismatch_kl" not in metrics
