"""Advantage estimators against hand-computed values."""

import math

import pytest

from forge.reward.advantages import ADVANTAGE_ESTIMATORS, compute_advantages


def test_grpo_is_reward_minus_group_mean_over_sample_std():
    # group a: rewards 1, 0, 0, 1 -> mean 0.5, sample std sqrt(1/3)
    adv = compute_advantages([1.0, 0.0, 0.0, 1.0], ["a"] * 4, "grpo", eps=0.0)
    s = math.sqrt(1 / 3)
    assert adv == pytest.approx([0.5 / s, -0.5 / s, -0.5 / s, 0.5 / s])


def test_grpo_normalises_each_group_separately():
    adv = compute_advantages([1.0, 3.0, 10.0, 30.0], ["a", "a", "b", "b"], "grpo", eps=0.0)
    # each group is {low, high} with sample std |high - low| / sqrt(2)
    assert adv == pytest.approx([-1 / math.sqrt(2), 1 / math.sqrt(2), -1 / math.sqrt(2), 1 / math.sqrt(2)])


def test_grpo_gives_zero_to_a_lone_member_and_to_a_group_without_spread():
    adv = compute_advantages([1.0, 0.7, 0.7, 0.7], ["solo", "flat", "flat", "flat"], "grpo")
    assert adv == [0.0, 0.0, 0.0, 0.0]


def test_grpo_with_outcomes_divides_by_the_outcome_spread():
    # shaped rewards; the outcomes (1, 1, 0, 0) have sample std sqrt(1/3)
    rewards = [1.2, 1.0, 0.0, 0.0]
    adv = compute_advantages(rewards, ["g"] * 4, "grpo", eps=0.0, outcomes=[1, 1, 0, 0])
    s = math.sqrt(1 / 3)
    assert adv == pytest.approx([(1.2 - 0.55) / s, (1.0 - 0.55) / s, -0.55 / s, -0.55 / s])


def test_grpo_with_outcomes_uses_outcome_scale_where_every_outcome_is_equal():
    adv = compute_advantages([1.2, 1.0], ["g", "g"], "grpo", outcomes=[1, 1], outcome_scale=2.0)
    assert adv == pytest.approx([0.05, -0.05])


def test_dr_grpo_is_reward_minus_group_mean():
    adv = compute_advantages([1.0, 0.0, 0.0, 3.0], ["a", "a", "b", "b"], "dr_grpo")
    assert adv == pytest.approx([0.5, -0.5, -1.5, 1.5])


def test_rloo_subtracts_the_mean_of_the_other_members():
    adv = compute_advantages([1.0, 0.0, 2.0], ["a"] * 3, "rloo")
    # 1 - (0+2)/2 = 0; 0 - (1+2)/2 = -1.5; 2 - (1+0)/2 = 1.5
    assert adv == pytest.approx([0.0, -1.5, 1.5])


def test_rloo_gives_zero_to_a_lone_member():
    assert compute_advantages([5.0], ["a"], "rloo") == [0.0]


def test_reinforce_pp_baseline_centres_per_group_then_whitens_over_the_batch():
    adv = compute_advantages([1.0, 0.0, 4.0, 0.0], ["a", "a", "b", "b"], "reinforce_pp_baseline", eps=0.0)
    # centred: 0.5, -0.5, 2, -2 ; batch mean 0 ; sample std sqrt((0.25+0.25+4+4)/3)
    s = math.sqrt(8.5 / 3)
    assert adv == pytest.approx([0.5 / s, -0.5 / s, 2 / s, -2 / s])


def test_unknown_estimator_error_lists_the_registered_names():
    with pytest.raises(ValueError) as info:
        compute_advantages([1.0], ["a"], "ppo_gae")
    for name in ADVANTAGE_ESTIMATORS:
        assert name in str(info.value)


def test_an_option_the_estimator_does_not_take_is_a_clear_error():
    with pytest.raises(ValueError, match="rloo.*does not take eps"):
        compute_advantages([1.0, 0.0], ["a", "a"], "rloo", eps=1e-3)


def test_rewards_and_group_ids_must_pair_up():
    with pytest.raises(ValueError, match="2 rewards but 1 group ids"):
        compute_advantages([1.0, 0.0], ["a"], "grpo")
