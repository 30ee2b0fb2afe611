"""train.epochs_per_step (TRL's num_iterations, verl's ppo_epochs): each rollout batch is
trained on that many times, each pass minibatches_per_step optimizer steps on a fresh shuffle,
against the sampler's logprobs (PPO's old policy), and the learning-rate schedule counts them."""

from __future__ import annotations

import pytest
import torch
from step_gradient import two_groups

from forge.config import Config, ConfigError, load_config
from forge.train.trainer import Trainer, off_policy_note
from forge.types import Sample


def batch() -> list[Sample]:
    """Two groups of 4 that share a prompt, every advantage non-zero."""
    return two_groups(lambda group, member: (member - 1.5) * (1 if group else -1))


def trainer(tiny_checkpoint, **train) -> Trainer:
    cfg = Config()
    cfg.train.loss = "ppo_clip"
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)


def test_two_passes_over_a_batch_are_the_optimizer_steps_of_two_steps_on_it(tiny_checkpoint):
    """One step at epochs_per_step=2 takes exactly the 4 optimizer steps (2 minibatches a
    pass, each pass its own shuffle) that two steps at 1 take on the same batch; it counts
    one policy version and each sample once."""
    passes = trainer(tiny_checkpoint, minibatches_per_step=2, epochs_per_step=2)
    twice = trainer(tiny_checkpoint, minibatches_per_step=2)
    metrics = passes.train_step(batch())
    first, second = twice.train_step(batch()), twice.train_step(batch())
    for name, weight in passes.trainable.items():
        assert torch.equal(weight, twice.trainable[name]), name
    assert passes.policy_version == 1 and twice.policy_version == 2
    assert metrics["trained_samples"] == 8.0  # the batch's samples, not one per pass
    assert metrics["loss"] == pytest.approx((first["loss"] + second["loss"]) / 2)  # mean over the 4 steps
    moved = trainer(tiny_checkpoint, minibatches_per_step=2)
    moved.train_step(batch())
    assert any(
        not torch.equal(w, moved.trainable[n]) for n, w in passes.trainable.items()
    )  # the 2nd pass trained


def test_the_learning_rate_schedule_ends_at_the_last_pass_of_the_last_step(tiny_checkpoint):
    decaying = trainer(
        tiny_checkpoint, max_steps=2, epochs_per_step=3, lr_schedule="linear", learning_rate=0.01
    )
    """Linear decay over the run's 6 optimizer steps (2 steps x 3 passes): the rate of the
    4th (0-based step 3) is 1 - 3/5 of the peak, and the 6th, the last, takes the floor (0).
    Counting 2 optimizer steps, it would be 0 from the 2nd on."""
    decaying.train_step(batch())
    assert decaying.scheduler.get_last_lr()[0] == pytest.approx(0.01 * (1 - 3 / 5))
    rates = []
    original_step = decaying.optimizer.step

    def step(*args, **kwargs):
        rates.append(decaying.optimizer.param_groups[0]["lr"])
        return original_step(*args, **kwargs)

    decaying.optimizer.step = step
    decaying.train_step(batch())
    assert rates == pytest.approx([0.01 * 2 / 5, 0.01 * 1 / 5, 0.0])


def test_warmup_is_checked_against_every_pass():
    load_config(None, ["train.max_steps=2", "train.epochs_per_step=3", "train.warmup_steps=6"])
    with pytest.raises(ConfigError, match="x train.epochs_per_step"):
        load_config(None, ["train.max_steps=2", "train.epochs_per_step=3", "train.warmup_steps=7"])


def test_pg_over_several_passes_is_noted_and_ppo_clip_is_not():
    note = off_policy_note(load_config(None, ["train.epochs_per_step=2"]).train)
    assert note is not None and "train.epochs_per_step=2" in note and "train.loss=ppo_clip" in note
    assert (
        off_policy_note(load_config(None, ["train.epochs_per_step=2", "train.loss=ppo_clip"]).train) is None
    )
