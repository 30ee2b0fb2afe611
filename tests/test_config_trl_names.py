"""Config keys and values as a TRL GRPOTrainer or verl user writes them: each names Forge's
own key, and a loss, estimator or clip setting that cannot run is refused when the config
loads (by `--dry-run` too), not by the trainer after a rollout."""

from __future__ import annotations

import pytest

from forge.config import ConfigError, load_config


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("train.num_generations=8", "rollout.group_size"),  # TRL
        ("rollout.n=8", "rollout.group_size"),  # verl actor_rollout_ref.rollout.n
        ("train.beta=0.04", "train.kl_coef"),  # TRL
        ("train.kl_loss_coef=0.001", "train.kl_coef"),  # verl
        ("train.epsilon=0.2", "train.clip_low"),  # TRL
        ("train.epsilon_high=0.28", "train.clip_high"),  # TRL
        ("train.clip_ratio_low=0.2", "train.clip_low"),  # verl
        ("train.clip_ratio_high=0.28", "train.clip_high"),  # verl
        ("train.loss_type=dapo", "train.loss_aggregation"),  # TRL
        ("train.loss_agg_mode=token-mean", "train.loss_aggregation"),  # verl
        ("train.adv_estimator=grpo", "train.advantage"),  # verl
        ("rollout.max_completion_length=256", "rollout.max_new_tokens"),  # TRL
        ("rollout.max_response_length=256", "rollout.max_new_tokens"),  # verl
        ("train.lr_scheduler_type=cosine", "train.lr_schedule"),  # TRL (transformers)
        ("train.entropy_coeff=0.001", "train.entropy_coef"),  # verl
    ],
)
def test_a_trl_or_verl_key_names_the_forge_key(override, meant):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert f"did you mean {meant}?" in str(caught.value)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("train.loss=grpo", "pg"),  # TRL's loss_type value, not a Forge loss
        ("train.loss=dr_grpo", "ppo_clip"),
        ("train.advantage=dapo", "dr_grpo"),
        ("train.advantage=gae", "reinforce_pp_baseline"),
    ],
)
def test_an_unknown_loss_or_advantage_is_refused_naming_the_choices(override, named):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    message = str(caught.value)
    assert override.split("=")[0] in message and named in message


def test_every_built_in_loss_and_advantage_loads():
    from forge.reward.advantages import ADVANTAGE_ESTIMATORS
    from forge.train.losses import LOSSES

    for loss in LOSSES:
        assert load_config(None, [f"train.loss={loss}"]).train.loss == loss
    for advantage in ADVANTAGE_ESTIMATORS:
        assert load_config(None, [f"train.advantage={advantage}"]).train.advantage == advantage


@pytest.mark.parametrize(
    "override",
    [
        "train.tis_cap=0",
        "train.tis_cap=-1",
        "train.clip_low=1",
        "train.clip_low=1.5",
        "train.gspo_clip_low=1",
    ],
)
def test_a_clip_that_cannot_bound_a_ratio_is_refused(override):
    """A tis_cap of 0 or below was taken by the config and refused by LossConfig in the trainer
    actor at its start; clip_low >= 1 puts PPO's lower bound 1 - clip_low at or below 0, where
    no ratio is ever clipped from below."""
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", r"\.")):
        load_config(None, [override])


@pytest.mark.parametrize(
    ("overrides", "knob", "loss"),
    [
        (["train.clip_low=0.1"], "train.clip_low", "ppo_clip"),  # the default loss, pg
        (["train.loss=cispo", "train.clip_high=0.3"], "train.clip_high", "ppo_clip"),
        (["train.loss=ppo_clip", "train.gspo_clip_low=1e-3"], "train.gspo_clip_low", "gspo"),
        (["train.loss=gspo", "train.cispo_clip_high=3"], "train.cispo_clip_high", "cispo"),
    ],
)
def test_a_clip_set_for_another_loss_than_the_one_trained_is_refused(overrides, knob, loss):
    """TRL clips every GRPO loss at epsilon / epsilon_high; Forge's default loss, pg, reads no
    clip at all, so train.clip_low=0.1 on it trained unclipped with no word said. A clip at its
    default is let be: a run's own config.yaml writes every key."""
    with pytest.raises(ConfigError) as caught:
        load_config(None, overrides)
    message = str(caught.value)
    assert knob in message and f"train.loss={loss}" in message


def test_a_clip_at_its_default_or_for_the_loss_trained_loads():
    assert load_config(None, ["train.loss=ppo_clip", "train.clip_high=0.3"]).train.clip_high == 0.3
    assert load_config(None, ["train.loss=gspo", "train.gspo_clip_low=1e-3"]).train.gspo_clip_low == 1e-3
    assert load_config(None, ["train.clip_high=0.28"]).train.loss == "pg"  # its default: as if unset
    assert load_config(None, ["train.loss=pg", "train.tis_cap=2"]).train.tis_cap == 2  # every loss takes it
