"""trainer.gradient_checkpointing (the GPU configs turn it on): the layers really run twice,
and the gradient is the one without it, in full fine-tuning and under LoRA."""

from __future__ import annotations

import pytest
import torch
from step_gradient import step_gradient

from forge.config import Config
from forge.train.trainer import Trainer
from forge.types import Sample


def gradient_and_mlp_calls(tiny_checkpoint, checkpointing: bool, lora: bool) -> tuple[torch.Tensor, int]:
    cfg = Config()
    cfg.model.lora.enabled = lora
    cfg.trainer.gradient_checkpointing = checkpointing
    trainer = Trainer(tiny_checkpoint, cfg.model, cfg.train, cfg.trainer, seed=0)
    if lora:  # peft zero-initialises B; make the adapters matter
        torch.manual_seed(1)
        for name, parameter in trainer.model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1)
    # A module inside the layer: transformers checkpoints the layer's forward, so the layer's
    # own hooks stay outside the checkpoint, while its submodules run again in the backward.
    # A pre-hook: the recompute stops once it has every saved tensor, before the MLP returns.
    mlp = next(m for name, m in trainer.model.named_modules() if name.endswith("layers.0.mlp"))
    calls = []
    mlp.register_forward_pre_hook(lambda *args: calls.append(1))
    generator = torch.Generator().manual_seed(0)
    samples = [
        Sample(torch.randint(5, 30, (12,), generator=generator).tolist(), [0] * 4 + [1] * 8, [-3.0] * 12,
               [0] * 12, advantage=(-1.0) ** i)
        for i in range(4)
    ]  # fmt: skip
    _, grad = step_gradient(trainer, samples)
    return grad, len(calls)


# No deprecation warning in any actor's log: Forge calls transformers' current checkpointing API
# (its gradient_checkpointing_* names warn of their removal), and peft's use of the old one is muted.
@pytest.mark.filterwarnings("error::FutureWarning")
@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_recomputes_the_layers_and_keeps_the_gradient(tiny_checkpoint, lora):
    plain, plain_calls = gradient_and_mlp_calls(tiny_checkpoint, checkpointing=False, lora=lora)
    checkpointed, checkpointed_calls = gradient_and_mlp_calls(tiny_checkpoint, checkpointing=True, lora=lora)
    assert checkpointed_calls == 2 * plain_calls  # forward, then again in the backward
    assert plain.norm() > 0
    assert ((checkpointed - plain).norm() / plain.norm()).item() <= 1e-6
