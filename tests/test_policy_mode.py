"""The trainer's forwards compute the policy the engine samples from: where a model's training
mode is random (dropout in its config, PhiMoE's sampled routing), an on-policy step still sees
every importance ratio at exactly 1, with gradient checkpointing on or off."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from forge.config import ModelConfig, TrainConfig, TrainerConfig
from forge.models.families import SHAPE
from forge.models.tiny import build_tokenizer
from forge.train.policy_mode import policy_mode
from forge.train.trainer import Trainer
from forge.types import Sample

RANDOM_IN_TRAINING = {
    # GPT-2's checkpoints carry these dropouts.
    "gpt2": dict(n_layer=2, n_head=4, n_embd=32, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1),
    # Its sparsemixer samples the routing in training mode; its own window never binds here.
    "phimoe": dict(head_dim=8, sliding_window=131072, num_local_experts=4, num_experts_per_tok=2,
                   input_jitter_noise=0.01),
    # OPT's checkpoints carry dropout 0.1, which its decoder layers apply in their own code.
    "opt": dict(dropout=0.1, attention_dropout=0.1, ffn_dim=64, word_embed_proj_dim=32),
}  # fmt: skip


def checkpoint(name: str, folder) -> None:
    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(name, **{**SHAPE, **RANDOM_IN_TRAINING[name], "vocab_size": len(tokenizer)})
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def on_policy_samples(model: torch.nn.Module, vocab: int) -> list[Sample]:
    """Behaviour logprobs from the model in eval mode, as the rollout engine samples."""
    generator = torch.Generator().manual_seed(0)
    was_training = model.training
    model.eval()
    samples = []
    with torch.no_grad():
        for i in range(6):
            tokens = torch.randint(2, vocab, (20,), generator=generator).tolist()
            ids = torch.tensor([tokens])
            logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0]
            samples.append(
                Sample(tokens, [0] * 5 + [1] * 15, [0.0, *logprobs.tolist()], [0] * 20, (-1.0) ** i)
            )
    model.train(was_training)
    return samples


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers' own checkpointing API rename
@pytest.mark.parametrize(
    ("name", "checkpointing"), [("gpt2", False), ("gpt2", True), ("phimoe", False), ("opt", True)]
)
def test_an_on_policy_step_sees_every_ratio_at_one_where_training_mode_is_random(
    name, checkpointing, tmp_path, capsys
):
    """In train mode the same step clipped PPO's ratio on 39% of GPT-2's tokens (mismatch KL
    0.47) and 2% of PhiMoE's (0.003). OPT's layers apply their dropout in their own code, by
    the flag gradient checkpointing needs (26% clipped): its trainer finds that at load and
    trains without checkpointing; GPT-2's keeps it."""
    checkpoint(name, tmp_path)
    trainer = Trainer(
        tmp_path,
        ModelConfig(path=str(tmp_path)),
        TrainConfig(loss="ppo_clip", minibatches_per_step=1),
        TrainerConfig(gradient_checkpointing=checkpointing),
    )
    assert trainer.packing == "tree"
    assert trainer.model.is_activation_checkpointing == (checkpointing and name != "opt")
    assert ("apply dropout of their own" in capsys.readouterr().out) == (name == "opt")
    metrics = trainer.train_step(on_policy_samples(trainer.model, len(trainer.tokenizer)))
    assert metrics["clip_fraction"] == 0.0
    assert metrics["mismatch_kl"] <= 1e-9
    assert abs(metrics["importance_ratio_mean"] - 1.0) <= 1e-6


def test_policy_mode_keeps_checkpointed_layers_and_lora_dropout_training(tmp_path):
    """transformers checkpoints a layer only while its own flag says it trains; peft's LoRA
    dropout (model.lora.dropout) is the user's to ask for. Everything else is in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers.modeling_layers import GradientCheckpointingLayer

    checkpoint("gpt2", tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    model.activation_checkpointing_enable()
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["c_attn"], lora_dropout=0.1))
    model.train()
    policy_mode(model)
    training = {name for name, module in model.named_modules() if module.training}
    layers = {name for name, m in model.named_modules() if isinstance(m, GradientCheckpointingLayer)}
    dropouts = {name for name in dict(model.named_modules()) if name.endswith("lora_dropout.default")}
    assert layers and len(dropouts) == 2
    assert training == layers | dropouts


def test_the_trainer_stops_on_layer_dropout_under_checkpointing_when_told_to(tmp_path):
    checkpoint("opt", tmp_path)
    with pytest.raises(RuntimeError, match="trainer.gradient_checkpointing: false"):
        Trainer(
            tmp_path,
            ModelConfig(path=str(tmp_path)),
            TrainConfig(),
            TrainerConfig(gradient_checkpointing=True, self_check="stop"),
        )


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_in_bf16_the_check_finds_opts_layer_dropout_and_passes_gpt2s(tmp_path, capsys):
    """The check holds the two forwards to forge.tree.agreement's rule in the model's dtype:
    OPT's own dropout (0.1) moves logprobs by ~2, far past bf16's bound (4 eps, 0.031, the
    eval pair differing by nothing on CPU), while GPT-2's two forwards, its dropouts in eval,
    are bitwise equal."""
    dtype = "bfloat16"
    for name in ("opt", "gpt2"):
        checkpoint(name, tmp_path / name)
        trainer = Trainer(
            tmp_path / name,
            ModelConfig(path=str(tmp_path / name), dtype=dtype),
            TrainConfig(),
            TrainerConfig(gradient_checkpointing=True),
        )
        assert trainer.model.get_input_embeddings().weight.dtype == getattr(torch, dtype)
        assert trainer.model.is_activation_checkpointing == (name == "gpt2")
    message = capsys.readouterr().out
    assert message.count("apply dropout of their own") == 1 and "OPTForCausalLM" in message
    assert "past the 2 largest" in message and "2 looks" in message and "4x the difference" in message
