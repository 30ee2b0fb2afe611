"""A train step that leaves the weights where they are, for comparing gradients."""

from __future__ import annotations

import warnings

import torch


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
