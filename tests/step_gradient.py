"""For trainer tests: a train step that leaves the weights where they are, for comparing
gradients, and a small batch of two groups that share a prompt."""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

from forge.types import Sample


def two_groups(advantage: Callable[[int, int], float]) -> list[Sample]:
    """Two groups of 4 samples, each group's members sharing a 10-token prompt before 6
    trained tokens (behaviour logprob -3, version 0); `advantage(group, member)`."""
    generator = torch.Generator().manual_seed(0)
    samples = []
    for group in range(2):
        prompt = torch.randint(5, 30, (10,), generator=generator).tolist()
        for member in range(4):
            tokens = prompt + torch.randint(5, 30, (6,), generator=generator).tolist()
            samples.append(
                Sample(tokens, [0] * 10 + [1] * 6, [-3.0] * 16, [0] * 16, advantage=advantage(group, member))
            )
    return samples


def step_gradient(trainer, samples) -> tuple[dict[str, float], torch.Tensor]:
    """`trainer.train_step(samples)` with the optimizer held still: the step's metrics and the
    gradient it would step with (clipped; summed over its minibatches, which all see the same
    weights), flattened on CPU. Compare gradients rather than stepped weights: Adam's first
    step moves each weight by about lr * sign(grad), so a near-zero element of the gradient
    could flip on rounding noise alone."""
    trainer.optimizer.step = lambda *args, **kwargs: None
    trainer.optimizer.zero_grad = lambda *args, **kwargs: None
    with warnings.catch_warnings():  # the scheduler notices the replaced step
        warnings.filterwarnings("ignore", "Seems like `optimizer.step\\(\\)` has been overridden")
        metrics = trainer.train_step(samples)
    grads = [p.grad for p in trainer.trainable.values()]
    assert all(g is not None for g in grads), "a trainable parameter got no gradient"
    return metrics, torch.cat([g.flatten().cpu() for g in grads])
