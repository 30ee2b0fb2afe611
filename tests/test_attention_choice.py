"""Attention is chosen per role, by what the model family supports, and Forge's tree attention
lives under its own registered names: it replaces nothing of transformers'."""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from forge.config import ConfigError, ModelConfig, load_config
from forge.models.families import FAMILIES
from forge.models.loading import choose_attn_implementation, load_model
from forge.tree import microbatches
from forge.tree.attention import TREE_IMPLEMENTATIONS, check_tree_support
from forge.types import Sample


@pytest.fixture(scope="module")
def gemma2_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("gemma2")
    FAMILIES["gemma2"].build("eager").save_pretrained(path)
    return path


def test_auto_picks_what_the_family_supports():
    gemma2 = FAMILIES["gemma2"].build("eager").config
    qwen2 = FAMILIES["qwen2"].build("eager").config
    assert choose_attn_implementation(qwen2, "auto", "cpu", "trainer.attn_implementation") == "sdpa"
    assert choose_attn_implementation(gemma2, "auto", "cpu", "trainer.attn_implementation") == "eager"
    assert (
        choose_attn_implementation(gemma2, "auto", "cuda", "trainer.attn_implementation") == "flex_attention"
    )


def test_gemma2_loads_with_the_default_settings(gemma2_checkpoint):
    model = load_model(gemma2_checkpoint, ModelConfig(path=str(gemma2_checkpoint)))
    assert model.config._attn_implementation == "eager"


def test_an_attention_the_family_lacks_is_forges_error_naming_the_setting(gemma2_checkpoint):
    with pytest.raises(
        ValueError, match=r"Gemma2ForCausalLM has no sdpa attention.*set rollout.attn_implementation"
    ):
        load_model(
            gemma2_checkpoint,
            ModelConfig(path=str(gemma2_checkpoint)),
            attn_implementation="sdpa",
            setting_key="rollout.attn_implementation",
        )


def test_trainer_and_rollout_attention_are_separate_settings(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("trainer: {attn_implementation: flex_attention}\nrollout: {attn_implementation: sdpa}\n")
    cfg = load_config(path)
    assert (cfg.trainer.attn_implementation, cfg.rollout.attn_implementation) == ("flex_attention", "sdpa")


def test_the_old_shared_setting_says_where_it_went(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {attn_implementation: sdpa}\n")
    with pytest.raises(ConfigError, match="trainer.attn_implementation and rollout.attn_implementation"):
        load_config(path)


def test_a_tree_forward_replaces_no_transformers_attention():
    tree_model, other = FAMILIES["llama"].build("sdpa"), FAMILIES["llama"].build("sdpa")
    [batch] = microbatches([Sample([1, 2, 3, 4], [1] * 4, [0.0] * 4, [0] * 4, 1.0)], "tree", 64)
    batch.forward_logprobs(tree_model)
    assert tree_model.config._attn_implementation == TREE_IMPLEMENTATIONS["sdpa"]
    assert other.config._attn_implementation == "sdpa"
    assert AttentionInterface()["sdpa"] is sdpa_attention_forward


def test_chunked_attention_on_unnamed_layers_is_refused_naming_the_setting():
    """Llama 4 names its chunked layers in layer_types and is exact (the family matrix); a
    config that chunks without saying which layers cannot be reproduced."""
    config = FAMILIES["llama"].build("sdpa").config
    config.attention_chunk_size = 8
    with pytest.raises(ValueError, match="chunked attention.*trainer.packing: padded"):
        check_tree_support(config)


def test_layers_the_tree_rule_cannot_reproduce_are_refused():
    config = FAMILIES["qwen2"].build("sdpa").config
    config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="linear_attention.*trainer.packing: padded"):
        check_tree_support(config)
    samples = [Sample([1, 2, 3], [1] * 3, [0.0] * 3, [0] * 3, 1.0)]
    model = FAMILIES["qwen2"].build("sdpa")
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(ValueError, match="trainer.packing: padded"), torch.no_grad():
        microbatches(samples, "tree", 64)[0].forward_logprobs(model)
