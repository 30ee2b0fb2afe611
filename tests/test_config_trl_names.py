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
