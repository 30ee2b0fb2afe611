"""Reward shaping terms against hand-computed values, lost episodes, and logging."""

import math

import pytest

from forge.config import ConfigError, RewardConfig, load_config
from forge.reward.shaping import (
    RewardShaper,
    kimi_length_values,
    overlong_value,
    speed_h,
    turn_discount_value,
)
from forge.types import Trajectory, Turn


def episode(
    success=True,
    turns=1,
    tokens=4,
    group="g",
    task="t",
    outcome=None,
    wall=0.0,
    tool=0.0,
    status="ok",
):
    """A trajectory with `turns` turns and `tokens` generated tokens (behind a 1-token prompt)."""
    mask = [0] + [1] * tokens
    turn_list = [Turn(start=1, end=1, obs_end=1, env_seconds=tool / max(turns, 1)) for _ in range(turns)]
    return Trajectory(
        task_id=task,
        group_id=group,
        token_ids=list(range(len(mask))),
        loss_mask=mask,
        behaviour_logprobs=[0.0] * len(mask),
        policy_versions=[0] * len(mask),
        prompt_length=1,
        turns=turn_list,
        outcome=(1.0 if success else 0.0) if outcome is None else outcome,
        success=success,
        status=status,
        wall_seconds=wall,
    )


def reward_config(**sections):
    return RewardConfig.model_validate(sections)


@pytest.mark.parametrize("kind", ["linear", "exponential", "sigmoid"])
def test_every_h_is_decreasing_from_near_1_to_0_with_half_at_the_baseline(kind):
    xs = [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 4.0, 50.0]
    values = [speed_h(x, kind) for x in xs]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))
    assert values[0] > 0.9 and values[-1] < 0.01
    assert speed_h(1.0, kind) == pytest.approx(0.5)
    assert all(0.0 <= v <= 1.0 for v in values) and speed_h(math.inf, kind) == 0.0


def test_speed_bonus_against_the_group_median_of_successes():
    trajs = [episode(turns=2), episode(turns=4), episode(turns=6), episode(success=False, turns=1)]
    config = reward_config(speed={"enabled": True, "weight": 0.2, "h": "linear"})
    RewardShaper(config).shape(trajs)
    # median of the successes' turns is 4: x = 0.5, 1, 1.5 -> h = 0.75, 0.5, 0.25; the failure gets none
    assert [t.reward for t in trajs] == pytest.approx([1.15, 1.10, 1.05, 0.0])


def test_speed_bonus_can_apply_to_failures_too():
    trajs = [episode(turns=2), episode(success=False, turns=2)]
    config = reward_config(speed={"enabled": True, "weight": 0.2, "apply_to": "all"})
    RewardShaper(config).shape(trajs)
    assert [t.reward for t in trajs] == pytest.approx([1.1, 0.1])


@pytest.mark.parametrize(
    ("measure", "fast", "slow"),
    [
        ("generated_tokens", {"tokens": 5}, {"tokens": 20}),
        ("wall_seconds", {"wall": 1.0}, {"wall": 4.0}),
        ("tool_seconds", {"tool": 0.5, "turns": 2}, {"tool": 2.0, "turns": 2}),
    ],
)
def test_speed_measures_read_the_matching_trajectory_field(measure, fast, slow):
    trajs = [episode(**fast), episode(**slow)]
    config = reward_config(
        speed={
            "enabled": True,
            "weight": 0.2,
            "measure": measure,
            "baseline": "fixed",
            "fixed_baseline": 5,
            "h": "exponential",
        }
    )
    RewardShaper(config).shape(trajs)
    assert trajs[0].reward > trajs[1].reward > 1.0


def test_fixed_speed_baseline():
    trajs = [episode(turns=3)]
    config = reward_config(speed={"enabled": True, "weight": 0.5, "baseline": "fixed", "fixed_baseline": 6})
    RewardShaper(config).shape(trajs)
    assert trajs[0].reward == pytest.approx(1.0 + 0.5 * 0.75)  # x = 0.5


def test_task_moving_average_baseline_is_the_group_median_first_then_the_running_average():
    config = reward_config(
        speed={"enabled": True, "weight": 0.2, "baseline": "task_moving_average", "moving_average_decay": 0.5}
    )
    shaper = RewardShaper(config)
    shaper.shape([episode(turns=4), episode(turns=8)])  # first visit: median 6 becomes the average
    assert shaper.task_baselines == {"t": 6.0}
    second = [episode(turns=3), episode(turns=3)]
    shaper.shape(second)
    assert second[0].reward == pytest.approx(1.0 + 0.2 * 0.75)  # scored against 6, x = 0.5
    assert shaper.task_baselines == {"t": 4.5}  # 0.5 * 6 + 0.5 * 3


def test_kimi_length_values_by_hand():
    # lengths 10, 20, 30: lambda = 0.5, 0, -0.5; the failure keeps only min(0, lambda)
    assert kimi_length_values([10, 20, 30, 10], [True, True, True, False]) == pytest.approx(
        [0.5, 0.0, -0.5, 0.0]
    )
    assert kimi_length_values([7, 7], [True, False]) == [0.0, 0.0]


def test_length_penalty_is_group_normalised():
    trajs = [episode(tokens=10, group="a"), episode(tokens=30, group="a"), episode(tokens=100, group="b")]
    RewardShaper(reward_config(length_penalty={"enabled": True, "weight": 0.1})).shape(trajs)
    assert [t.reward for t in trajs] == pytest.approx([1.05, 0.95, 1.0])


def test_overlong_penalty_ramps_down_over_the_buffer():
    assert overlong_value(60, max_tokens=100, buffer_tokens=40) == 0.0
    assert overlong_value(80, max_tokens=100, buffer_tokens=40) == pytest.approx(-0.5)
    assert overlong_value(100, max_tokens=100, buffer_tokens=40) == pytest.approx(-1.0)
    assert overlong_value(500, max_tokens=100, buffer_tokens=40) == -1.0


def test_turn_discount_by_hand():
    assert turn_discount_value(1, 0.9) == 0.0
    assert turn_discount_value(3, 0.9) == pytest.approx(0.81 - 1.0)


def test_turn_discount_applies_to_successes_only():
    trajs = [episode(turns=3), episode(success=False, turns=3)]
    RewardShaper(reward_config(turn_discount={"enabled": True, "weight": 0.5, "gamma": 0.5})).shape(trajs)
    assert [t.reward for t in trajs] == pytest.approx([1.0 + 0.5 * (0.25 - 1.0), 0.0])


def test_lost_episodes_get_no_reward_and_stay_out_of_the_group_median():
    lost = episode(turns=100, status="lost")
    lost.reward = -7.0
    trajs = [episode(turns=2), episode(turns=6), lost]
    metrics = RewardShaper(reward_config(speed={"enabled": True, "weight": 0.2})).shape(trajs)
    assert lost.reward == -7.0 and "reward_terms" not in lost.info
    # median of 2 and 6 is 4 (not 6, as it would be with the lost episode's 100)
    assert [t.reward for t in trajs[:2]] == pytest.approx([1.15, 1.05])
    assert metrics["reward/lost_episodes"] == 1.0


def test_metrics_report_the_raw_outcome_and_each_enabled_term():
    trajs = [episode(turns=2, tokens=10), episode(turns=6, tokens=30), episode(success=False, tokens=50)]
    config = reward_config(
        speed={"enabled": True, "weight": 0.2},
        length_penalty={"enabled": True, "weight": 0.1},
        overlong={"enabled": True, "weight": 0.1, "max_tokens": 40, "buffer_tokens": 20},
        turn_discount={"enabled": True, "weight": 0.1},
    )
    metrics = RewardShaper(config).shape(trajs)
    assert metrics["reward/outcome"] == pytest.approx(2 / 3)
    for name in ("speed", "length_penalty", "overlong", "turn_discount"):
        per_episode = [t.info["reward_terms"][name] for t in trajs]
        assert metrics[f"reward/{name}"] == pytest.approx(sum(per_episode) / 3)
    total = [t.outcome + sum(t.info["reward_terms"].values()) for t in trajs]
    assert [t.reward for t in trajs] == pytest.approx(total)
    assert metrics["reward/total"] == pytest.approx(sum(total) / 3)


def test_disabled_terms_leave_the_outcome_alone():
    trajs = [episode(turns=2, outcome=0.7), episode(success=False, outcome=0.2)]
    metrics = RewardShaper(RewardConfig()).shape(trajs)
    assert [t.reward for t in trajs] == [0.7, 0.2]
    assert "reward/speed" not in metrics


def test_weights_summing_to_the_outcome_gap_are_refused_with_the_fix():
    with pytest.raises(ConfigError, match="sum to 1.1.*lower them"):
        load_config(
            None,
            [
                "reward.speed.enabled=true",
                "reward.speed.weight=0.6",
                "reward.length_penalty.enabled=true",
                "reward.length_penalty.weight=0.5",
            ],
        )


def test_fixed_speed_baseline_needs_a_value():
    with pytest.raises(ConfigError, match="fixed_baseline"):
        load_config(None, ["reward.speed.enabled=true", "reward.speed.baseline=fixed"])
