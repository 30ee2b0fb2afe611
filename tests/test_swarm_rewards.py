"""Agent-cluster rewards: critical steps and seconds as speed measures, PARL's spawn and
finish terms annealed to zero, and the invariant that any success outranks any failure, at
the reward and the advantage level (hypothesis), with those terms in play."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.config import ConfigError, RewardConfig, load_config
from forge.reward.advantages import ADVANTAGE_ESTIMATORS
from forge.reward.shaping import RewardShaper, anneal_scale, parl_values, speed_measure, trajectory_advantages
from forge.types import Trajectory, Turn


def episode(turns=1, success=True, subagents=(), group="g", outcome=None, parent_turn=None, seconds=None):
    mask = [0, 1]
    return Trajectory(
        "t", group, [1, 2], mask, [0.0, 0.0], [-1, 0], 1,
        turns=[Turn(1, 2, 2, generation_seconds=seconds or 0.0) for _ in range(turns)],
        outcome=(1.0 if success else 0.0) if outcome is None else outcome, success=success,
        subagents=list(subagents), parent_turn=parent_turn,
    )  # fmt: skip


def helper(turns=1, success=True, at=0):
    return episode(turns, success, parent_turn=at)


def test_critical_steps_are_a_speed_measure_that_ignores_parallel_helpers():
    team = episode(2, subagents=[helper(1), helper(1), helper(1), helper(1)])
    alone = episode(4)
    assert speed_measure(team, "critical_steps") == 3 and speed_measure(alone, "critical_steps") == 4
    assert speed_measure(team, "turns") == 2  # turns alone would miss the helpers' time


def test_a_steps_token_counts_include_every_sub_agents_tokens():
    from forge.metrics import rollout_metrics

    nested = helper(1)
    nested.subagents = [helper(1)]
    team = episode(2, subagents=[helper(1), nested])  # four agents of two tokens, one sampled each
    metrics = rollout_metrics([team, episode(1)])
    assert (metrics["tokens_generated"], metrics["tokens_total"]) == (5.0, 10.0)


def test_critical_seconds_are_the_episodes_own_model_and_tool_time():
    team = episode(2, seconds=0.5)
    team.turns[0].env_seconds = 3.0  # the spawn call: waiting for its slowest helper
    assert speed_measure(team, "critical_seconds") == pytest.approx(4.0)


def test_speed_shaping_on_critical_steps_rewards_the_team_over_the_lone_agent():
    team = episode(2, subagents=[helper(1) for _ in range(4)])  # 3 critical steps
    alone = episode(4)
    config = RewardConfig.model_validate(
        {"speed": {"enabled": True, "weight": 0.2, "measure": "critical_steps"}}
    )
    RewardShaper(config).shape([team, alone])
    # median 3.5: x = 3/3.5 and 4/3.5 under linear h
    assert team.reward == pytest.approx(1 + 0.2 * (1 - 3 / 7)) and alone.reward == pytest.approx(
        1 + 0.2 * (1 - 4 / 7)
    )


def test_parl_values_count_spawned_helpers_up_to_the_cap_and_the_share_that_finished():
    assert parl_values(episode(2), spawn_cap=4) == (0.0, 0.0)
    three = episode(2, subagents=[helper(), helper(success=False), helper()])
    assert parl_values(three, spawn_cap=4) == (0.75, pytest.approx(2 / 3))
    assert parl_values(three, spawn_cap=2) == (1.0, pytest.approx(2 / 3))
    nested = episode(2, subagents=[episode(1, subagents=[helper()], parent_turn=0)])
    assert parl_values(nested, spawn_cap=4) == (0.5, 1.0)  # every level counts


def test_parl_weights_anneal_linearly_to_zero_over_their_share_of_training():
    assert [anneal_scale(p, 0.5) for p in (0.0, 0.25, 0.5, 0.9)] == [1.0, 0.5, 0.0, 0.0]
    assert anneal_scale(None, 0.5) == 1.0
    config = RewardConfig.model_validate({"parl": {"enabled": True, "spawn_weight": 0.2, "finish_weight": 0.1,
                                                   "spawn_cap": 2, "anneal_fraction": 0.5}})  # fmt: skip
    rewards = []
    for progress in (0.0, 0.25, 0.5):
        team = episode(2, subagents=[helper(), helper(success=False)])
        metrics = RewardShaper(config).shape([team], progress=progress)
        rewards.append(team.reward)
        assert metrics["reward/parl_weight_scale"] == anneal_scale(progress, 0.5)
    # full: 1 + 0.2 * 1 + 0.1 * 0.5; half way through the anneal, half of that; then nothing
    assert rewards == pytest.approx([1.25, 1.125, 1.0])


def test_parl_terms_count_against_the_shaping_budget():
    with pytest.raises(ConfigError, match="parl.spawn.weight=0.5"):
        load_config(None, ["swarm.enabled=true", "reward.parl.enabled=true", "reward.parl.spawn_weight=0.5",
                           "reward.speed.enabled=true", "reward.speed.weight=0.45"])  # fmt: skip


def test_parl_needs_the_spawn_tool():
    with pytest.raises(ConfigError, match="set swarm.enabled: true"):
        load_config(None, ["reward.parl.enabled=true"])


@st.composite
def swarm_configs(draw):
    budget = draw(st.floats(0.0, 0.99))
    shares = draw(st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=3, max_size=3))
    total = sum(shares) or 1.0
    speed, spawn, finish = (share / total * budget for share in shares)
    return RewardConfig.model_validate(
        {
            "outcome_gap": draw(st.floats(0.01, 5.0)),
            "speed": {
                "enabled": True,
                "weight": speed,
                "measure": draw(st.sampled_from(["critical_steps", "critical_seconds"])),
                "baseline": draw(st.sampled_from(["group_median", "task_moving_average"])),
                "h": draw(st.sampled_from(["linear", "exponential", "sigmoid"])),
                "apply_to": draw(st.sampled_from(["success", "all"])),
            },
            "parl": {
                "enabled": True,
                "spawn_weight": spawn,
                "finish_weight": finish,
                "spawn_cap": draw(st.integers(1, 8)),
                "anneal_fraction": draw(st.floats(0.01, 1.0)),
            },
        }
    )


@st.composite
def helpers(draw, turns):
    return [
        episode(
            draw(st.integers(0, 4)),
            draw(st.booleans()),
            parent_turn=draw(st.integers(0, max(turns - 1, 0))),
            seconds=draw(st.floats(0.0, 5.0)),
        )  # fmt: skip
        for _ in range(draw(st.integers(0, 6)))
    ]


@st.composite
def team_batches(draw, outcome_gap):
    """Orchestrator episodes with random helpers; successes score >= outcome_gap above failures."""
    failure_top = draw(st.floats(-2.0, 2.0))
    batch = []
    for _ in range(draw(st.integers(1, 12))):
        success = draw(st.booleans())
        outcome = failure_top + (
            outcome_gap + draw(st.floats(0.0, 2.0)) if success else -draw(st.floats(0.0, 2.0))
        )
        turns = draw(st.integers(0, 6))
        batch.append(episode(turns, success, draw(helpers(turns)), group=draw(st.sampled_from(["g0", "g1"])),
                             outcome=outcome, seconds=draw(st.floats(0.0, 5.0))))  # fmt: skip
    return batch


@st.composite
def shaped_team_batches(draw):
    config = draw(swarm_configs())
    batch = draw(team_batches(config.outcome_gap))
    RewardShaper(config).shape(batch, progress=draw(st.one_of(st.none(), st.floats(0.0, 1.0))))
    return config, batch


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shaped_team_batches())
def test_with_parl_and_critical_path_speed_any_success_outranks_any_failure(shaped):
    _, batch = shaped
    successes = [t.reward for t in batch if t.success]
    failures = [t.reward for t in batch if not t.success]
    if successes and failures:
        assert min(successes) > max(failures)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shaped_team_batches(), st.sampled_from(sorted(ADVANTAGE_ESTIMATORS)))
def test_with_parl_every_success_has_a_higher_advantage_than_every_failure_of_its_group(shaped, estimator):
    config, batch = shaped
    advantages = trajectory_advantages(batch, estimator, outcome_gap=config.outcome_gap)
    for group in {t.group_id for t in batch}:
        members = [(a, t.success) for a, t in zip(advantages, batch, strict=True) if t.group_id == group]
        successes = [a for a, won in members if won]
        failures = [a for a, won in members if not won]
        if successes and failures:
            assert min(successes) > max(failures)
