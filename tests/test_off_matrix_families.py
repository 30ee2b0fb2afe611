"""Model families outside the matrix (forge.models.families), as a new user brings them.

The trainer's self-check passes on those the tree path computes exactly and catches the rest
(the trainer then packs them padded); the rollout engine's check keeps behaviour logprobs a
fresh forward's: it drops the shared prompt where a family's cache or attention is not plain
(MLA's compressed latents, differential attention) and refuses, naming the setting, what its
KV cache cannot serve (linear-attention, SSM or conv layers, chunked attention, a local window
it does not count by position), as `forge train` does before Ray starts."""

from __future__ import annotations

import pytest
import torch
from test_engine_families import play_group, play_ragged
from test_model_families import family_samples
from test_tree_exact import packed_results, separate_results
from transformers import AutoConfig, AutoModelForCausalLM

from forge.config import Config, ConfigError
from forge.models.families import SHAPE, WINDOW
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest
from forge.run.launch import preflight
from forge.tree import attention
from forge.tree.self_check import check_tree_path

MLA = dict(kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8, head_dim=4,
           num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1,
           moe_intermediate_size=16)  # fmt: skip
OFF_MATRIX = {
    # exact on the tree path (sdpa, or eager where the family has no sdpa)
    "smollm3": dict(head_dim=8, no_rope_layers=[1, 0]),  # a layer without rotary
    "olmo3": dict(sliding_window=WINDOW, num_hidden_layers=4),  # 3 sliding, 1 full
    "exaone4": dict(head_dim=8, sliding_window=WINDOW, sliding_window_pattern=2),
    "glm4": dict(head_dim=8, partial_rotary_factor=0.5),
    "deepseek_v2": dict(MLA, q_lora_rank=None),  # MLA + MoE (deepseek_v3 is in the matrix)
    "diffllama": dict(head_dim=8),  # differential attention
    "seed_oss": dict(head_dim=8),
    "ministral": dict(head_dim=8, sliding_window=WINDOW),
    # Its last 2 layers read the KV of the last earlier layer of their type and keep none.
    "gemma3n_text": dict(head_dim=8, sliding_window=WINDOW, num_hidden_layers=4, num_kv_shared_layers=2,
                         layer_types=["sliding_attention", "full_attention"] * 2, altup_num_inputs=2,
                         laurel_rank=4, hidden_size_per_layer_input=8, vocab_size_per_layer_input=64,
                         intermediate_size=[64] * 4, activation_sparsity_pattern=[0.0] * 4),
    # Fused qkv clipped at 1 (binds on these weights), MoE. Its attn_config needs rope_theta (a real
    # checkpoint's has it; transformers' default lacks it), and d_model itself: hidden_size alone
    # leaves the experts 2048 wide.
    "dbrx": dict(d_model=32, attn_config=dict(kv_n_heads=2, clip_qkv=1.0, rope_theta=10000.0),
                 ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2)),
    # MoE with a shared expert; layer 1 slides (layers from max_window_layers on, as Qwen2).
    "dots1": dict(head_dim=8, sliding_window=WINDOW, max_window_layers=1, n_routed_experts=4, num_experts_per_tok=2,
                  n_shared_experts=1, moe_intermediate_size=16, first_k_dense_replace=1),
    # MLA, and MoE with zero (identity) experts; each of its num_layers holds two attentions.
    "longcat_flash": dict(num_layers=1, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=4, qk_rope_head_dim=4,
                          head_dim=4, v_head_dim=8, num_key_value_heads=4, ffn_hidden_size=64, n_routed_experts=4,
                          moe_topk=2, zero_expert_num=2, expert_ffn_hidden_size=16),
    # not computable by the tree rule
    "qwen3_next": dict(head_dim=8, layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                       linear_num_key_heads=2, linear_key_head_dim=8, linear_value_head_dim=8, num_experts=4,
                       num_experts_per_tok=2, moe_intermediate_size=16, shared_expert_intermediate_size=16),

    "lfm2": dict(layer_types=["conv", "full_attention"], block_dim=32, block_ff_dim=64, conv_L_cache=3),
    "lfm2_moe": dict(layer_types=["conv", "full_attention"], num_dense_layers=1, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16),
    # SSM layers (transformers calls them linear_attention); Zamba2 adds a shared attention ("hybrid").
    "mamba2": dict(num_heads=8, head_dim=8, state_size=16, n_groups=1, chunk_size=8),
    "zamba2": dict(layers_block_type=["mamba", "hybrid"], n_mamba_heads=4, mamba_d_state=16, adapter_rank=4,
                   chunk_size=8),
    # Its default local window (256): longer than the engine check's sequences.
    "gpt_neo": dict(num_layers=2, attention_types=[[["global", "local"], 1]], num_heads=4),
    "falcon": dict(alibi=False, new_decoder_architecture=False),  # its attention drops the tree keyword
    "bloom": dict(n_layer=2, n_head=4),  # ALiBi, its own attention code
    # A dynamic mask from learned weights: at their init (A = 0) it adds the same to every score, so
    # the tree's logprobs agreed while its gradients left A and dt_proj untrained.
    "doge": dict(),
    # Slides every layer by its mask alone (the window never reaches the attention call as a keyword):
    # the tree would attend past it; the check shrinks the window and sees that.
    "phimoe": dict(head_dim=8, sliding_window=WINDOW, num_local_experts=4, num_experts_per_tok=2),
}  # fmt: skip
EXACT = [
    "smollm3",
    "olmo3",
    "exaone4",
    "glm4",
    "deepseek_v2",
    "diffllama",
    "seed_oss",
    "ministral",
    "gemma3n_text",
    "dbrx",
    "dots1",
    "longcat_flash",
]
CAUGHT = {
    "qwen3_next": "layers of type linear_attention",
    "lfm2": "layers of type conv",
    "lfm2_moe": "layers of type conv",
    "mamba2": "layers of type linear_attention",
    "zamba2": "layers of type hybrid, linear_attention",
    "gpt_neo": "never received Forge's tree layout",
    "falcon": "never received Forge's tree layout",
    "bloom": "the tree forward failed",
    "doge": "makes a mask of its own",
    "phimoe": "largest logprob difference",
}


def build(name: str, attn_implementation: str | None = None, seed: int = 0) -> torch.nn.Module:
    """The family's tiny random-init model, on sdpa where it has it (else eager)."""
    config = AutoConfig.for_model(name, **{**SHAPE, **OFF_MATRIX[name]})
    model_class = AutoModelForCausalLM._model_mapping[type(config)]
    implementation = attn_implementation or ("sdpa" if model_class._supports_sdpa else "eager")
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, attn_implementation=implementation).float().eval()


@pytest.mark.parametrize("name", EXACT)
def test_the_self_check_passes_where_the_tree_path_is_exact(name):
    result = check_tree_path(build(name))
    assert result.ok, result.reason
    assert result.max_error <= 1e-5


@pytest.mark.parametrize("name", EXACT)
def test_where_the_self_check_passes_tree_gradients_equal_separate_forwards(name, monkeypatch):
    """The self-check compares logprobs; the loss gradients agree too (split trees, windows
    binding on these samples), as the family matrix checks on its families."""
    monkeypatch.setattr(attention, "QUERY_BLOCK", 5)  # the block-sparse path splits these trees
    samples = family_samples(seed=len(name))
    want_logprobs, want_grad, scale = separate_results(build(name), samples)
    logprobs, grad = packed_results(build(name), samples, "tree", 24)
    assert (
        max((g - w).abs().max().item() for g, w in zip(logprobs, want_logprobs, strict=True) if len(w))
        <= 1e-5
    )
    assert ((grad - want_grad).norm() / scale).item() <= 1e-5


@pytest.mark.parametrize("name", list(CAUGHT))
def test_the_self_check_catches_what_the_tree_path_cannot_compute(name):
    result = check_tree_path(build(name))
    assert not result.ok
    assert CAUGHT[name] in result.reason


def test_phimoe_at_a_window_no_trained_sequence_reaches_keeps_the_tree(tmp_path):
    """PhiMoE applies its window in its mask alone: one that binds is caught (above). Its real
    window (131072) binds on no sequence of at most trainer.max_tokens_per_microbatch tokens
    (microbatches refuses longer ones), so the check leaves it as declared and passes; with a
    budget that reaches it the check shrinks it, as any window, and catches the model."""
    from forge.config import ModelConfig, TrainConfig, TrainerConfig
    from forge.models.tiny import build_tokenizer
    from forge.train.trainer import Trainer

    model = build("phimoe")
    model.config.sliding_window = 131072
    assert check_tree_path(model, longest=8192).ok
    assert not check_tree_path(model, longest=131072).ok  # a 131072-token sequence may reach its edge
    tokenizer = build_tokenizer()
    model.resize_token_embeddings(len(tokenizer))
    model.config.vocab_size = len(tokenizer)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    trainer = Trainer(
        tmp_path, ModelConfig(path=str(tmp_path)), TrainConfig(), TrainerConfig(self_check="stop")
    )
    assert trainer.packing == "tree" and trainer.self_check_result.ok
    assert trainer.model.config.sliding_window == 131072


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", [n for n in EXACT if n not in ("deepseek_v2", "diffllama", "gemma3n_text", "longcat_flash")]
)
def test_the_engine_check_passes_where_the_engine_is_exact(name):
    """The engine's own check (sliding windows of 4, a shared prompt, pad holes) passes; it would
    raise otherwise."""
    engine = HFEngine(build(name), [1], pad_token_id=0)
    windowless_sdpa = ("smollm3", "glm4", "seed_oss", "dbrx")
    assert engine.share_prompt == (name in windowless_sdpa)


@pytest.mark.parametrize("name", ["deepseek_v2", "longcat_flash", "diffllama"])
def test_the_engine_copies_the_prompt_where_sharing_it_would_be_wrong(name):
    """MLA (DeepSeek V2, LongCat Flash) caches compressed latents, not the keys its attention
    reads (sharing them raised from inside the attention); differential attention combines two
    maps the shared-prompt attention does not (behaviour logprobs were off by 5). The engine's
    check drops sharing."""
    model = build(name)
    engine = HFEngine(model, [1], pad_token_id=0, seed=3)
    assert not engine.share_prompt
    play_group(engine, model, turns=3)  # every token against a fresh forward


@pytest.mark.parametrize("name", ["smollm3", "glm4"])
def test_the_engine_keeps_sharing_the_prompt_on_plain_attention(name):
    model = build(name)
    engine = HFEngine(model, [1], pad_token_id=0, seed=3)
    assert engine.share_prompt
    play_group(engine, model, turns=2)


def test_the_engine_samples_a_model_whose_layers_share_kv_exactly():
    """Gemma 3n's KV-shared layers keep no cache of their own: setting a batch's rows aside
    (an episode joining) read their empty layers (a TypeError before)."""
    model = build("gemma3n_text")
    engine = HFEngine(model, [1], pad_token_id=0, seed=3)
    episodes: dict = {}
    play_ragged(engine, model, turns=3, seed=0, contexts=episodes)
    episodes["late"] = [5, 6, 7, 8, 9]  # a new episode: the batch is laid out again from per-episode caches
    play_ragged(engine, model, turns=3, seed=1, contexts=episodes)


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("qwen3_next", "layers of type linear_attention"),
        ("lfm2", "layers of type conv"),
        ("lfm2_moe", "layers of type conv"),
        ("mamba2", "layers of type linear_attention"),
        ("zamba2", "layers of type hybrid, linear_attention"),
        ("gpt_neo", "local attention layers"),  # a window counted in columns: off by 1.3 at window 6
    ],
)
def test_the_engine_refuses_what_its_kv_cache_cannot_serve_naming_the_setting(name, reason):
    with pytest.raises(ValueError, match=f"{reason}.*rollout.engine: remote"):
        HFEngine(build(name), [1], pad_token_id=0)


@pytest.mark.parametrize(
    ("model_type", "config"),
    [
        ("gpt2", dict(n_layer=2, n_head=4, n_embd=32, max_position_embeddings=32)),
        ("opt", dict(max_position_embeddings=32)),
    ],
)
def test_the_engine_refuses_a_request_past_a_learned_position_table_naming_the_setting(model_type, config):
    """GPT-2 and OPT learn one embedding per position: a longer context raised an IndexError from
    inside torch's embedding (OPT's table holds 2 more rows than positions)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        AutoConfig.for_model(model_type, **{**SHAPE, **config}), attn_implementation="eager"
    ).eval()
    engine = HFEngine(model, [], pad_token_id=0, seed=3)
    assert (
        len(engine.generate([GenerationRequest(list(range(2, 29)), 5)])[0].token_ids) == 5
    )  # 32 positions: fits
    with pytest.raises(ValueError, match="past the 32 positions.*rollout.max_context_tokens to at most 32"):
        engine.generate([GenerationRequest(list(range(2, 30)), 5)])


def test_an_engine_context_past_a_learned_position_table_is_refused_naming_the_setting_alone():
    """The smoke config's context (1024) on a GPT-2 of 32 positions: refused when the engine is
    built, naming rollout.max_context_tokens; the self-check used to fail first and advise
    another engine, which would not help."""
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "gpt2", **{**SHAPE, "n_layer": 2, "n_head": 4, "n_embd": 32, "max_position_embeddings": 24}
    )
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
    with pytest.raises(ValueError, match="max_context_tokens=1024 runs past the 24 positions") as refused:
        HFEngine(model, [], pad_token_id=0, max_context_tokens=1024)
    assert "rollout.engine" not in str(refused.value)


@pytest.mark.parametrize("name", ["qwen3_next", "mamba2"])
def test_forge_train_refuses_a_model_the_engine_cannot_serve_before_ray_starts(name, tmp_path):
    from forge.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    model = build(name)
    model.resize_token_embeddings(len(tokenizer))  # a tokenizer past the embeddings is refused first
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)  # a checkpoint without one is refused first
    cfg = Config.model_validate({"model": {"path": str(tmp_path)}, "env": {"name": "guess_number"}})
    with pytest.raises(ConfigError, match="linear_attention.*rollout.engine: remote"):
        preflight(cfg)
    preflight(
        Config.model_validate(
            {**cfg.model_dump(), "rollout": {"engine": "remote", "servers": ["http://x:1"]}}
        )
    )
