"""The mode the trainer's forwards run the model in: the policy the rollout engine samples from
(no dropout, no router jitter or sampled routing), with gradient checkpointing still working."""

from __future__ import annotations

import torch


def policy_mode(model: torch.nn.Module, lora_dropout: bool = True) -> None:
    """Put `model` in eval mode, except the flags gradient checkpointing and LoRA dropout read.

    In train mode a model's forward is random wherever its config asks for it: dropout (GPT-2's
    and OPT's checkpoints carry 0.1), router jitter, PhiMoE's routing sampled by its sparsemixer.
    Its logprobs are then not the policy's the engine sampled (eval mode): on an on-policy step
    a tiny GPT-2 with its 0.1 dropouts had PPO's ratio clipped on 39% of tokens, PhiMoE on 2%.
    In eval mode the forward is that policy and autograd runs as ever. Left in train mode:
    a checkpointed layer's own flag (transformers checkpoints a layer only while it trains;
    its children stay in eval) and, with `lora_dropout`, peft's LoRA dropout
    (model.lora.dropout, asked for by name).
    """
    model.eval()
    from transformers.modeling_layers import GradientCheckpointingLayer

    for name, module in model.named_modules():
        if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
            module.training = True  # this module only: its attention, MLP and dropouts stay in eval
        elif lora_dropout and name.rsplit(".", 2)[-2:-1] == ["lora_dropout"]:
            module.train()


def policy_forward_noise(model: torch.nn.Module, tokens: list[int]) -> tuple[list[float], list[float]]:
    """Per position of `tokens`, the largest logprob difference between two forwards in
    `policy_mode` (LoRA dropout left out), and between two in eval mode (the device's own
    run-to-run noise, e.g. MoE's atomic adds on a GPU; none on CPU). The first exceeds the
    second only where the model's checkpointed layers draw randomness of their own from their
    training flag (OPT's, BioGPT's and XGLM's layers apply their dropout in their own code).
    Leaves the model in eval mode."""
    ids = torch.tensor([tokens], device=model.get_input_embeddings().weight.device)

    def spread() -> list[float]:
        with torch.no_grad():  # the layer's own code reads its flag with or without grad
            first, second = (
                model(input_ids=ids, use_cache=False).logits.float().log_softmax(-1) for _ in range(2)
            )
        return (first - second).abs().amax(-1)[0].tolist()

    try:
        policy_mode(model, lora_dropout=False)
        policy = spread()
        model.eval()
        return policy, spread()
    finally:
        model.eval()
