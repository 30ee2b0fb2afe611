"""Pairs of settings under which one of them can never act are refused, naming both: a
warmup longer than the run, a decay floor on a constant schedule, an overlong penalty
past the most tokens an episode can generate."""

from __future__ import annotations

import pytest

from forge.config import ConfigError, load_config


def test_a_warmup_as_long_as_the_run_is_refused():
    """At 40 steps and warmup_steps=500 the rate ended at 8% of train.learning_rate."""
    with pytest.raises(ConfigError, match=r"train.warmup_steps=500.*40 optimizer steps"):
        load_config(None, ["train.max_steps=40", "train.warmup_steps=500"])
    with pytest.raises(ConfigError, match=r"train.warmup_steps=81"):  # 40 steps x 2 minibatches
        load_config(None, ["train.max_steps=40", "train.minibatches_per_step=2", "train.warmup_steps=81"])
    # As long as the run: its last optimizer step takes the whole rate ((step + 1) / warmup).
    assert load_config(None, ["train.max_steps=40", "train.warmup_steps=40"]).train.warmup_steps == 40


def test_a_decay_floor_on_a_constant_schedule_is_refused():
    with pytest.raises(ConfigError, match=r"train.min_lr_ratio=0.1.*train.lr_schedule=constant"):
        load_config(None, ["train.min_lr_ratio=0.1"])
    assert load_config(None, ["train.min_lr_ratio=0.1", "train.lr_schedule=cosine"]).train.min_lr_ratio == 0.1


def test_an_overlong_penalty_no_episode_can_reach_is_refused():
    """DAPO's defaults (4096 tokens, a 1024 buffer) against Forge's 8 turns of 16 tokens: the
    penalty starts past 3072 generated tokens, and an episode generates at most 128."""
    with pytest.raises(ConfigError, match=r"reward.overlong.*128"):
        load_config(None, ["reward.overlong.enabled=true"])
    fits = [
        "reward.overlong.enabled=true",
        "reward.overlong.max_tokens=128",
        "reward.overlong.buffer_tokens=32",
    ]
    assert load_config(None, fits).reward.overlong.max_tokens == 128
    off = load_config(None, ["reward.overlong.max_tokens=4096"])  # not enabled: nothing to act
    assert off.reward.overlong.enabled is False
