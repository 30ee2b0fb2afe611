"""A run whose episodes outgrow the model's context says so, naming the lengths and the keys to
change: before Ray starts for a learned position table shorter than rollout.max_context_tokens,
per episode (counted, printed once per kind) when an episode's tokens leave no room for a reply,
and the trainer never gets tokens past the context the episode kept to."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, Phi3Config

from forge.config import ConfigError
from forge.rollout.agent import EpisodeLimits, context_full
from forge.rollout.engines.engine_check import refuse_context_past_positions
from forge.rollout.engines.hf import HFEngine
from forge.types import Sample, Trajectory

LIMITS = EpisodeLimits(
    max_turns=3, max_new_tokens=40, max_context_tokens=64, step_timeout_s=1, episode_timeout_s=1
)


def test_a_context_past_a_learned_position_table_is_refused_before_ray_naming_the_keys(tmp_path):
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2, n_positions=64)
    ).save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"rollout.max_context_tokens=1024 runs past the 64 positions GPT2LMHeadModel.*set rollout.max_context_tokens to at most 64",
    ):
        refuse_context_past_positions(str(tmp_path), tmp_path, 1024)
    refuse_context_past_positions(str(tmp_path), tmp_path, 64)  # fits: no refusal


def longrope_phi3(switch: int) -> torch.nn.Module:
    """A tiny Phi-3 whose longrope scales every position by its long factors once a forward
    reaches past `switch` tokens (Phi-3/3.5's 128k models switch at 4096)."""
    half = 8  # head_dim 16
    config = Phi3Config(
        vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8 * switch, original_max_position_embeddings=switch,
        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half,
                         "long_factor": [4.0] * half, "original_max_position_embeddings": switch},
        pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def test_a_rope_that_rescales_by_a_forwards_longest_sequence_is_refused_past_its_switch(tmp_path):
    """Why: a short sequence padded beside one past the switch is scored under the long
    factors, not its own forward's (transformers picks them by the batch's largest position),
    so packing, padding and cached turns would all train another policy than the sampled one."""
    model = longrope_phi3(switch=32)
    short, long = torch.randint(3, 64, (1, 20)), torch.randint(3, 64, (1, 40))
    ids, mask = torch.zeros(2, 40, dtype=torch.long), torch.zeros(2, 40, dtype=torch.long)
    ids[0, 20:], mask[0, 20:], ids[1], mask[1] = short, 1, long, 1
    with torch.no_grad():
        alone = model(short).logits[0]
        batched = model(ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).logits[
            0, 20:
        ]
    assert (batched - alone).abs().max() > 1e-3  # the defect the refusal keeps out
    model.save_pretrained(tmp_path)
    with pytest.raises(
        ConfigError,
        match=r"max_context_tokens=64 runs past the 32 tokens after which Phi3ForCausalLM's longrope RoPE.*"
        r"set rollout.max_context_tokens to at most 32",
    ):
        refuse_context_past_positions(str(tmp_path), tmp_path, 64)
    refuse_context_past_positions(
        str(tmp_path), tmp_path, 32
    )  # within the switch: every forward is short-scaled
    with pytest.raises(ConfigError, match="longrope RoPE"):
        HFEngine(model, [2], pad_token_id=0, max_context_tokens=64, self_check=False)


def test_an_episode_whose_prompt_leaves_no_room_for_a_reply_is_an_error_naming_lengths_and_keys():
    status, error = context_full(30, 0, LIMITS)
    assert status == "error"
    assert error.startswith("context full before any reply:")
    for said in ("30 tokens", "rollout.max_new_tokens=40", "rollout.max_context_tokens=64"):
        assert said in error


def test_an_episode_that_fills_its_context_mid_run_is_cut_short_with_the_reason():
    status, error = context_full(59, 1, LIMITS)
    assert status == "truncated"
    assert "after 1 replies" in error and "59 tokens" in error and "rollout.max_context_tokens=64" in error


def test_a_sample_ends_at_its_last_trained_token():
    """The env's last observation after the last reply (and the eos closing a cut reply) can
    run past a GPT-2's position table: the trainer's forward raised an IndexError from inside
    torch's embedding. They move no logprob the loss reads."""
    trajectory = Trajectory(
        task_id="t", group_id="g", token_ids=[1, 2, 3, 4, 5, 6], loss_mask=[0, 0, 1, 1, 0, 0],
        behaviour_logprobs=[0.0, 0.0, -1.0, -2.0, 0.0, 0.0], policy_versions=[-1, -1, 0, 0, -1, -1],
        prompt_length=2,
    )  # fmt: skip
    sample = Sample.from_trajectory(trajectory, 1.0)
    assert sample.token_ids == [1, 2, 3, 4] and sample.loss_mask == [0, 0, 1, 1]
    assert sample.behaviour_logprobs == [0.0, 0.0, -1.0, -2.0] and sample.policy_versions == [-1, -1, 0, 0]
