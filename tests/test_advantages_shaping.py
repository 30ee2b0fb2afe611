"""Shaping must not drown the success signal in the advantages (issue 7, item 4).

The prototype that collapsed: reward = success + 0.5 * (1 - turns / K) on success, with
std-normalised GRPO. In a group where every episode succeeds the only spread left is the
turn bonus, and dividing by that group's std turns a one-turn difference into a +-1
advantage, as large as succeeding versus failing in a mixed group. These tests pin the
default path (forge.reward.shaping) to keep speed advantages small next to success.
"""

import pytest

from forge.config import RewardConfig
from forge.reward.advantages import compute_advantages
from forge.reward.shaping import RewardShaper, trajectory_advantages
from forge.types import Trajectory, Turn

MIXED = [(True, 3), (True, 4), (True, 5), (True, 6), (False, 8), (False, 8), (False, 8), (False, 8)]
ALL_SOLVED = [(True, 3), (True, 4), (True, 4), (True, 5), (True, 5), (True, 5), (True, 6), (True, 7)]


def batch():
    trajectories = []
    for group, members in (("mixed", MIXED), ("solved", ALL_SOLVED)):
        for success, turns in members:
            trajectories.append(
                Trajectory(
                    task_id=group,
                    group_id=group,
                    token_ids=[0, 1],
                    loss_mask=[0, 1],
                    behaviour_logprobs=[0.0, 0.0],
                    policy_versions=[0, 0],
                    prompt_length=1,
                    turns=[Turn(0, 0, 0) for _ in range(turns)],
                    outcome=float(success),
                    success=success,
                )
            )
    return trajectories


def split(advantages, trajectories):
    by_group = {"mixed": ([], []), "solved": ([], [])}
    for advantage, t in zip(advantages, trajectories, strict=True):
        by_group[t.group_id][0 if t.success else 1].append(advantage)
    return by_group


def success_gap_and_speed_spread(advantages, trajectories):
    groups = split(advantages, trajectories)
    mixed_successes, mixed_failures = groups["mixed"]
    solved = groups["solved"][0]
    gap = min(mixed_successes) - max(mixed_failures)
    speed_spread = max(max(mixed_successes) - min(mixed_successes), max(solved) - min(solved))
    return gap, speed_spread


@pytest.mark.parametrize("estimator", ["grpo", "reinforce_pp_baseline"])
def test_default_speed_shaping_keeps_the_success_gap_dominant(estimator):
    trajectories = batch()
    RewardShaper(RewardConfig.model_validate({"speed": {"enabled": True}})).shape(trajectories)
    advantages = trajectory_advantages(trajectories, estimator)
    gap, speed_spread = success_gap_and_speed_spread(advantages, trajectories)
    assert gap > 4 * speed_spread


def test_default_speed_advantages_in_an_all_success_group_stay_within_the_weight():
    trajectories = batch()
    config = RewardConfig.model_validate({"speed": {"enabled": True, "weight": 0.2}})
    RewardShaper(config).shape(trajectories)
    solved = split(trajectory_advantages(trajectories, "grpo"), trajectories)["solved"][0]
    assert max(abs(a) for a in solved) <= 0.2
    assert max(solved) > 0  # the faster episodes are still preferred


def test_textbook_std_normalisation_of_a_naive_turn_bonus_lets_speed_rival_success():
    # The collapsed prototype, reproduced: what the default path above must not do.
    trajectories = batch()
    horizon = 8
    rewards = [t.outcome + (0.5 * (1 - t.num_turns / horizon) if t.success else 0.0) for t in trajectories]
    advantages = compute_advantages(rewards, [t.group_id for t in trajectories], "grpo")
    gap, speed_spread = success_gap_and_speed_spread(advantages, trajectories)
    assert speed_spread > gap


def token_weighted_mean_advantage(advantages, trajectories, group):
    """The net push a token-mean loss gives the tokens all of a group's episodes share:
    slow episodes have more tokens, so negative speed advantages outweigh positive ones."""
    pairs = [(a, t.num_turns) for a, t in zip(advantages, trajectories, strict=True) if t.group_id == group]
    return sum(a * length for a, length in pairs) / sum(length for _, length in pairs)


def test_default_speed_shaping_puts_almost_no_net_push_on_an_all_success_group():
    trajectories = batch()
    RewardShaper(RewardConfig.model_validate({"speed": {"enabled": True}})).shape(trajectories)
    advantages = trajectory_advantages(trajectories, "grpo")
    assert abs(token_weighted_mean_advantage(advantages, trajectories, "solved")) < 0.02


def test_naive_turn_bonus_pushes_every_shared_token_of_a_solved_group_down():
    trajectories = batch()
    rewards = [t.outcome + (0.5 * (1 - t.num_turns / 8) if t.success else 0.0) for t in trajectories]
    advantages = compute_advantages(rewards, [t.group_id for t in trajectories], "grpo")
    # about as strong as the push a group with failures gives (about -0.27 here)
    assert token_weighted_mean_advantage(advantages, trajectories, "solved") < -0.2
