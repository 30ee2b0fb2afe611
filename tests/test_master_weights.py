"""bfloat16 weights trained through float32 master copies (forge.train.master_weights): steps
smaller than a bfloat16 weight's precision add up in the copy instead of rounding away, the
weights stay the copy rounded, and a resumed optimizer keeps the copies in float32."""

from __future__ import annotations

import copy

import pytest
import torch

from forge.train.master_weights import MASTER, MasterWeightAdamW


def fraction_moved(
    optimizer_class: type, steps: int = 50, lr: float = 1e-5
) -> tuple[float, torch.optim.Optimizer, torch.nn.Parameter]:
    """A 0.02-scale bfloat16 tensor pushed the same way each step by 1e-3-sized gradients:
    the fraction of its weights that moved."""
    generator = torch.Generator().manual_seed(0)
    start = (torch.randn(4096, generator=generator) * 0.02).to(torch.bfloat16)
    param = torch.nn.Parameter(start.clone())
    optimizer = optimizer_class([param], lr=lr, weight_decay=0.0)
    for _ in range(steps):
        param.grad = (torch.randn(4096, generator=generator) * 1e-3).abs().to(torch.bfloat16)
        optimizer.step()
    return (param.detach() != start).float().mean().item(), optimizer, param


def test_steps_below_bfloat16_precision_add_up_in_the_float32_copy():
    plain, _, _ = fraction_moved(torch.optim.AdamW)
    master, optimizer, param = fraction_moved(MasterWeightAdamW)
    assert plain < 0.3 and master == 1.0  # plain bfloat16 AdamW: most weights never moved
    copy = optimizer.state[param][MASTER]
    assert copy.dtype == optimizer.state[param]["exp_avg"].dtype == torch.float32
    assert param.dtype == param.grad.dtype == torch.bfloat16
    assert torch.equal(param.detach(), copy.to(torch.bfloat16))  # the weight is its copy, rounded


def test_a_resumed_optimizer_keeps_its_copies_and_moments_in_float32_and_steps_the_same():
    _, optimizer, param = fraction_moved(MasterWeightAdamW, steps=5)
    saved = copy.deepcopy(optimizer.state_dict())  # as a checkpoint holds it, apart from the live state
    twin = torch.nn.Parameter(param.detach().clone())
    resumed = MasterWeightAdamW([twin], lr=1e-5, weight_decay=0.0)
    resumed.load_state_dict(saved)
    assert resumed.state[twin][MASTER].dtype == torch.float32
    assert torch.equal(resumed.state[twin][MASTER], optimizer.state[param][MASTER])
    gradient = torch.full((4096,), 1e-3, dtype=torch.bfloat16)
    for p, opt in ((param, optimizer), (twin, resumed)):
        p.grad = gradient.clone()
        opt.step()
    assert torch.equal(resumed.state[twin][MASTER], optimizer.state[param][MASTER])
    assert torch.equal(twin, param)


@pytest.mark.parametrize("fused", [False, True])
def test_float32_parameters_beside_bfloat16_ones_step_as_plain_adamw(fused):
    generator = torch.Generator().manual_seed(1)
    low = torch.nn.Parameter(torch.randn(64, generator=generator).to(torch.bfloat16))
    full = torch.nn.Parameter(torch.randn(64, generator=generator))
    reference = torch.nn.Parameter(full.detach().clone())
    mixed = MasterWeightAdamW([low, full], lr=1e-2, fused=fused or None)
    plain = torch.optim.AdamW([reference], lr=1e-2, fused=fused or None)
    for _ in range(3):
        gradient = torch.randn(64, generator=generator)
        low.grad, full.grad, reference.grad = gradient.to(torch.bfloat16), gradient.clone(), gradient.clone()
        mixed.step()
        plain.step()
    assert torch.equal(full, reference) and MASTER not in mixed.state[full]


def test_many_micro_batches_sum_their_gradients_in_float32(tiny_checkpoint):
    """One sample with advantage 1 and 32 with 1e-3, each its own micro-batch (the long one
    first, as padded packing orders them): summed in bfloat16 every small gradient rounds away
    against the large one (1e-3 of it is below half a bfloat16 step), so the step's gradient came
    out short of the one all 33 give in one micro-batch (its norm 2.1% smaller); in float32 they agree."""
    from forge.config import ModelConfig, TrainConfig, TrainerConfig
    from forge.train.trainer import Trainer
    from forge.types import Sample

    tokens = torch.randint(8, 40, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    samples = [Sample(tokens, [0] * 5 + [1] * 19, [-1.5] * 24, [0] * 24, advantage=1.0)]
    samples += [Sample(tokens[:20], [0] * 5 + [1] * 15, [-1.5] * 20, [0] * 20, advantage=1e-3)] * 32

    def grad_norm(max_tokens_per_microbatch):
        trainer = Trainer(
            tiny_checkpoint,
            ModelConfig(path=str(tiny_checkpoint), dtype="bfloat16"),
            TrainConfig(learning_rate=1e-5, max_grad_norm=1e6),
            TrainerConfig(packing="padded", max_tokens_per_microbatch=max_tokens_per_microbatch),
        )
        metrics = trainer.train_step(samples)
        return metrics["grad_norm"], metrics["microbatches"]

    (each, thirty_three), (together, one) = grad_norm(24), grad_norm(8192)
    assert (thirty_three, one) == (33, 1)
    assert each == pytest.approx(together, rel=5e-3)  # measured 0.12% apart; in bfloat16, 2.1%
