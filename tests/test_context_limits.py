"""A run whose episodes outgrow the model's context says so, naming the lengths and the keys to
change: before Ray starts for a learned position table shorter than rollout.max_context_tokens,
per episode (counted, printed once per kind) when an episode's tokens leave no room for a reply,
and the trainer never gets tokens past the context the episode kept to."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from forge.config import ConfigError
from forge.rollout.agent import EpisodeLimits, context_full
from forge.rollout.engines.engine_check import refuse_context_past_positions
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
