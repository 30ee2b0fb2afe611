"""KL to the frozen initial policy: a separate frozen copy, or the LoRA model with its
adapters switched off."""

from __future__ import annotations

import math

import pytest
import torch

from forge.config import Config
from forge.train.trainer import Trainer, lr_factor
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


def test_a_first_step_without_learning_signal_warns_nothing(tiny_checkpoint):
    """The schedule counts a skipped step; torch's warning about a scheduler step before any
    optimizer step reached the console of every run whose first step had no signal."""
    import warnings

    cfg = Config()
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    tokens = [list(range(5, 15)), list(range(6, 16))]
    samples = [Sample(t, [0] * 3 + [1] * 7, [0.0] * 10, [0] * 10, advantage=0.0) for t in tokens]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert trainer.train_step(samples)["optimizer_steps_skipped"] == 1.0
    assert not [w for w in caught if "lr_scheduler" in str(w.message)]


def test_entropy_bonus_alone_raises_the_policy_entropy(tiny_checkpoint):
    """With every advantage zero the entropy term is the whole gradient: the step is
    taken (not skipped) and the entropy at the trained tokens goes up."""
    cfg = Config()
    cfg.train.entropy_coef = 0.5
    # 1e-3: at 1e-2 Adam's first steps overshoot the entropy's maximum (ln of the vocabulary)
    # and it swings back (3.74, 5.52, 5.41, 3.61 on the tiny model), whichever way it was pushed.
    cfg.train.learning_rate = 1e-3
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    generator = torch.Generator().manual_seed(0)
    tokens = [torch.randint(5, 30, (10,), generator=generator).tolist() for _ in range(4)]
    samples = [Sample(t, [0] * 3 + [1] * 7, [0.0] * 10, [0] * 10, advantage=0.0) for t in tokens]
    first = trainer.train_step(samples)
    for _ in range(3):
        later = trainer.train_step(samples)
    assert first["optimizer_steps_skipped"] == 0.0 and first["grad_norm"] > 0
    assert later["entropy"] > first["entropy"] > 0


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]),
        # 7 optimizer steps: 2 of warmup, then from 1.0 at step 2 down to 0.1 at step 6; flat after
        ("linear", [0.5, 1.0, 1.0, 0.775, 0.55, 0.325, 0.1, 0.1]),
        ("cosine", [0.5, 1.0, 1.0, 0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2, 0.55,
                    0.1 + 0.9 * (1 + math.cos(3 * math.pi / 4)) / 2, 0.1, 0.1]),
    ],
)  # fmt: skip
def test_lr_factor_warms_up_then_follows_the_schedule(schedule, expected):
    got = [lr_factor(step, warmup=2, total=7, schedule=schedule, min_ratio=0.1) for step in range(8)]
    assert got == pytest.approx(expected)


def test_trainer_decays_the_learning_rate_over_the_whole_run(tiny_checkpoint):
    cfg = Config()
    cfg.train.max_steps, cfg.train.minibatches_per_step = 3, 2
    cfg.train.lr_schedule, cfg.train.learning_rate = "linear", 1e-2
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    tokens = [[5, 6, 7, 8, 9, 10], [5, 6, 7, 11, 12, 13]]
    samples = [
        Sample(t, [0] * 3 + [1] * 3, [0.0] * 6, [0] * 6, advantage=(-1.0) ** i) for i, t in enumerate(tokens)
    ]
    rates = [trainer.train_step(samples)["learning_rate"] for _ in range(3)]
    # 6 optimizer steps; the rate logged after each train_step is the next step's
    assert rates == pytest.approx([1e-2 * 3 / 5, 1e-2 * 1 / 5, 0.0])


class PaddedTrainer(Trainer):
    """Runs two padding micro-batches after its own, as a data-parallel process does when
    another process has more micro-batches."""

    def microbatches_to_run(self, num_microbatches: int) -> int:
        return num_microbatches + 2


@pytest.mark.parametrize("packing", ["tree", "padded"])
@pytest.mark.parametrize(("loss", "kl_coef", "entropy_coef"), [
    ("pg", 0.0, 0.0), ("ppo_clip", 0.1, 0.01), ("cispo", 0.0, 0.0), ("gspo", 0.0, 0.0),
])  # fmt: skip
def test_padding_microbatches_leave_the_gradient_and_the_metrics_exactly_alone(
    tiny_checkpoint, packing, loss, kl_coef, entropy_coef
):
    def step(trainer_class):
        cfg = Config()
        cfg.trainer.packing = packing
        cfg.train.loss, cfg.train.kl_coef, cfg.train.entropy_coef = loss, kl_coef, entropy_coef
        trainer = trainer_class(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
        generator = torch.Generator().manual_seed(0)
        samples = []
        for i in range(4):
            tokens = torch.randint(5, 30, (12,), generator=generator).tolist()
            samples.append(Sample(tokens, [0] * 4 + [1] * 8, [-3.0] * 12, [0] * 12, advantage=i - 1.5))
        metrics = trainer.train_step(samples)
        metrics.pop("train_seconds")
        return metrics, {name: p.detach().clone() for name, p in trainer.trainable.items()}

    metrics, weights = step(Trainer)
    padded_metrics, padded_weights = step(PaddedTrainer)
    assert padded_metrics == metrics  # tokens and micro-batch counts leave padding out too
    assert all(torch.equal(padded_weights[name], weights[name]) for name in weights)
