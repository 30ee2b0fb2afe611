"""The trainer's self-check at load: the tree path against separate forwards through the
loaded model itself. It passes on the supported families and catches model code the tree rule
does not reproduce; the trainer then falls back to padded packing, or stops (a setting)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention

from forge.config import ModelConfig, TrainConfig, TrainerConfig
from forge.models.families import FAMILIES, SHAPE, build_lora
from forge.models.tiny import build_tokenizer
from forge.train.trainer import Trainer
from forge.tree.self_check import check_tree_path


class KeywordDroppingAttention(LlamaAttention):
    """Model code that forwards only the arguments it names: Forge's tree layout never
    reaches the attention function of the layers that use it."""

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
        return super().forward(hidden_states, position_embeddings, attention_mask, cache)


class IndexScaledAttention(LlamaAttention):
    """Model code that scales attention by a token's index in the sequence: equal to its
    position in a separate forward, not in a packed tree."""

    def forward(self, hidden_states, *args, **kwargs):
        output, weights = super().forward(hidden_states, *args, **kwargs)
        index = torch.arange(output.shape[1], dtype=output.dtype, device=output.device)
        return output * (1 + index / 8)[None, :, None], weights


class OddConfig(LlamaConfig):
    model_type = "forge_odd_llama"

    def __init__(self, odd_attention: str = "drop", odd_layers: int = 2, **kwargs):
        self.odd_attention, self.odd_layers = odd_attention, odd_layers
        super().__init__(**kwargs)


class OddLlamaForCausalLM(LlamaForCausalLM):
    config_class = OddConfig

    def __init__(self, config):
        super().__init__(config)
        odd = {"drop": KeywordDroppingAttention, "scale": IndexScaledAttention}[config.odd_attention]
        for layer in self.model.layers[: config.odd_layers]:
            layer.self_attn.__class__ = odd


AutoConfig.register(OddConfig.model_type, OddConfig)
AutoModelForCausalLM.register(OddConfig, OddLlamaForCausalLM)


def odd_model(odd_attention: str, odd_layers: int = 2, attn_implementation: str = "sdpa") -> torch.nn.Module:
    torch.manual_seed(0)
    config = OddConfig(
        odd_attention, odd_layers, **SHAPE, head_dim=8, attn_implementation=attn_implementation
    )
    return OddLlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["qwen2", "mistral", "gemma2", "gemma3", "qwen3_moe"])
def test_self_check_passes_on_supported_families(name, implementation):
    family = FAMILIES[name]
    if implementation not in family.attention_implementations():
        pytest.skip(f"{name} has no {implementation} attention")
    result = check_tree_path(family.build(implementation))
    assert result.ok, result.reason
    assert result.max_error <= 1e-5


def test_self_check_passes_on_a_lora_model_in_bf16():
    model = build_lora(FAMILIES["gemma2"], "eager").to(torch.bfloat16)
    result = check_tree_path(model)
    assert result.ok, result.reason
    assert result.tolerance >= 4 * torch.finfo(torch.bfloat16).eps  # bf16's own rounding is allowed


def test_self_check_shrinks_declared_windows_and_restores_them():
    model = FAMILIES["mistral"].build("sdpa")
    model.config.sliding_window = 4096  # longer than any check sequence: the check shrinks it
    assert check_tree_path(model).ok
    assert model.config.sliding_window == 4096


@pytest.mark.parametrize("odd_layers", [2, 1], ids=["every-layer", "one-layer"])
def test_self_check_catches_a_model_that_drops_the_tree_keyword(odd_layers):
    result = check_tree_path(odd_model("drop", odd_layers))
    assert not result.ok
    assert ("never received" in result.reason) if odd_layers == 2 else ("logprob difference" in result.reason)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_self_check_catches_attention_scaled_by_sequence_index(implementation):
    result = check_tree_path(odd_model("scale", attn_implementation=implementation))
    assert not result.ok
    assert result.max_error > 1e-2


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("odd_model")
    model = odd_model("scale")
    tokenizer = build_tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    model.config.vocab_size = len(tokenizer)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_trainer(path, self_check: str) -> Trainer:
    return Trainer(path, ModelConfig(path=str(path)), TrainConfig(), TrainerConfig(self_check=self_check))


def test_trainer_falls_back_to_padded_packing_when_the_self_check_fails(odd_checkpoint, capsys):
    trainer = make_trainer(odd_checkpoint, "fallback")
    assert trainer.packing == "padded"
    assert "tree path disagrees with separate forwards" in capsys.readouterr().out
    from forge.types import Sample

    metrics = trainer.train_step([Sample([1, 2, 3, 4], [0, 1, 1, 1], [0.0] * 4, [0] * 4, advantage=1.0)])
    assert metrics["tree_token_ratio"] == 1.0  # padded: nothing merged


def test_trainer_stops_when_the_self_check_fails_and_it_is_told_to(odd_checkpoint):
    with pytest.raises(RuntimeError, match="trainer.packing: padded"):
        make_trainer(odd_checkpoint, "stop")


def test_trainer_falls_back_with_its_other_processes_when_one_of_them_fails(tiny_checkpoint, capsys):
    """Data-parallel processes must run the same packing (or their collectives stop matching):
    a check that passed here still falls back when another process's failed."""

    class OneOfTwo(Trainer):
        world_size = 2

        def all_agree(self, ok: bool) -> bool:
            return False  # the other process's check failed

    trainer = OneOfTwo(
        tiny_checkpoint, ModelConfig(path=str(tiny_checkpoint)), TrainConfig(), TrainerConfig()
    )
    assert trainer.packing == "padded"
    assert "disagrees with separate forwards on this model: on another of the trainer's processes" in (
        capsys.readouterr().out
    )


def test_trainer_keeps_the_tree_on_a_model_that_passes(tiny_checkpoint):
    trainer = make_trainer(tiny_checkpoint, "stop")
    assert trainer.packing == "tree" and trainer.self_check_result.ok
