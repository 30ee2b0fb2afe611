"""The mode the trainer's forwards run the model in: the policy the rollout engine samples from
(no dropout, no router jitter or sampled routing), with gradient checkpointing still working."""

from __future__ import annotations

import torch


def policy_mode(model: torch.nn.Module) -> None:
    """Put `model` in eval mode, except the flags gradient checkpointing and LoRA dropout read.

    In train mode a model's forward is random wherever its config asks for it: dropout (GPT-2's
    and OPT's checkpoints carry 0.1), router jitter, PhiMoE's routing sampled by its sparsemixer.
    Its logprobs are then not the policy's the engine sampled (eval mode): on an on-policy step
    a tiny GPT-2 with its 0.1 dropouts had PPO's ratio clipped on 39% of tokens, PhiMoE on 2%.
    In eval mode the forward is that policy and autograd runs as ever. Left in train mode:
    a checkpointed layer's own flag (transformers checkpoints a layer only while it trains;
    its children stay in eval) and peft's LoRA dropout (model.lora.dropout, asked for by name).
    """
    model.eval()
    from transformers.modeling_layers import GradientCheckpointingLayer

    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True  # this module only: its attention, MLP and dropouts stay in eval
        elif name.rsplit(".", 2)[-2:-1] == ["lora_dropout"]:
            module.train()
