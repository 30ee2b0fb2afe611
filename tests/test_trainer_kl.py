"""KL to the frozen initial policy: a separate frozen copy, or the LoRA model with its
adapters switched off."""

from __future__ import annotations

import pytest
import torch

from forge.config import Config
from forge.train.trainer import Trainer
from forge.types import Sample


@pytest.mark.parametrize("lora", [False, True])
def test_kl_to_the_reference_starts_at_zero_and_grows_as_the_policy_moves(tiny_checkpoint, lora):
    cfg = Config()
    cfg.model.lora.enabled = lora
    cfg.train.kl_coef = 0.1
    cfg.train.learning_rate = 5e-2
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    generator = torch.Generator().manual_seed(0)
    samples = []
    for i in range(4):
        tokens = torch.randint(5, 30, (12,), generator=generator).tolist()
        mask = [0] * 4 + [1] * 8
        samples.append(Sample(tokens, mask, [0.0] * 12, [0] * 12, advantage=1.0 if i % 2 else -1.0))
    first = trainer.train_step(samples)
    for _ in range(3):
        later = trainer.train_step(samples)
    assert first["ref_kl"] == pytest.approx(0.0, abs=1e-6)
    assert later["ref_kl"] > 1e-4


def test_a_step_without_learning_signal_leaves_the_weights_and_the_optimizer_alone(tiny_checkpoint):
    """All advantages zero (every group all-success or all-failure) gives an exactly zero
    gradient; AdamW would still move the weights on the momentum of earlier steps."""
    cfg = Config()
    cfg.train.learning_rate = 1e-2
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    generator = torch.Generator().manual_seed(0)

    def batch(advantage):
        tokens = [torch.randint(5, 30, (10,), generator=generator).tolist() for _ in range(4)]
        return [Sample(t, [0] * 3 + [1] * 7, [0.0] * 10, [0] * 10, advantage=advantage * (-1) ** i)
                for i, t in enumerate(tokens)]  # fmt: skip

    assert trainer.train_step(batch(1.0))["optimizer_steps_skipped"] == 0.0  # builds momentum
    before = {name: p.detach().clone() for name, p in trainer.trainable.items()}
    momentum = {name: trainer.optimizer.state[p]["exp_avg"].clone() for name, p in trainer.trainable.items()}
    metrics = trainer.train_step(batch(0.0))
    assert metrics["grad_norm"] == 0.0 and metrics["optimizer_steps_skipped"] == 1.0
    for name, p in trainer.trainable.items():
        assert torch.equal(p.detach(), before[name]), name
    for name, p in trainer.trainable.items():
        assert torch.equal(trainer.optimizer.state[p]["exp_avg"], momentum[name]), name
    assert trainer.policy_version == 2  # the step still counts: workers sync once per batch
    assert trainer.train_step(batch(1.0))["optimizer_steps_skipped"] == 0.0


def test_entropy_bonus_alone_raises_the_policy_entropy(tiny_checkpoint):
    """With every advantage zero the entropy term is the whole gradient: the step is
    taken (not skipped) and the entropy at the trained tokens goes up."""
    cfg = Config()
    cfg.train.entropy_coef = 0.5
    cfg.train.learning_rate = 1e-2
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randint(5, 30, (10,), generator=generator).tolist() for _ in range(4)]
    samples = [Sample(t, [0] * 3 + [1] * 7, [0.0] * 10, [0] * 10, advantage=0.0) for t in tokens]
    first = trainer.train_step(samples)
    for _ in range(3):
        later = trainer.train_step(samples)
    assert first["optimizer_steps_skipped"] == 0.0 and first["grad_norm"] > 0
    assert later["entropy"] > first["entropy"] > 0
