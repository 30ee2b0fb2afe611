"""`train.negative_advantage_weight`: the advantages below zero, and only those, are multiplied
by it after the estimator, wherever a run makes advantages (every mode's `shape_rewards`,
sub-agents' in `to_samples`); 1 (the default) leaves them bit for bit as the estimator made them."""

from __future__ import annotations

import pytest

from forge.config import Config, ConfigError, load_config
from forge.reward.advantages import ADVANTAGE_ESTIMATORS, compute_advantages, weight_negative_advantages
from forge.reward.shaping import RewardShaper
from forge.run.context import shape_rewards, to_samples
from forge.types import Trajectory, Turn

# groups with spread, a lone member and a flat group: negatives, positives and zeros
REWARDS = [1.0, 0.0, 0.0, 0.0, 1.0, 0.3, 0.7, 0.7]
GROUPS = ["a", "a", "a", "a", "solo", "b", "b", "b"]


@pytest.mark.parametrize("estimator", sorted(ADVANTAGE_ESTIMATORS))
def test_the_weight_multiplies_exactly_the_negative_advantages(estimator):
    plain = compute_advantages(REWARDS, GROUPS, estimator)
    weighted = compute_advantages(REWARDS, GROUPS, estimator, negative_weight=0.25)
    assert any(a < 0 for a in plain) and any(a > 0 for a in plain)
    assert 0.0 in plain or estimator == "reinforce_pp_baseline"  # it centres the whole batch: no zeros
    assert weighted == [a * 0.25 if a < 0 else a for a in plain]


def test_the_default_weight_returns_the_estimators_advantages_bit_for_bit():
    raw = ADVANTAGE_ESTIMATORS["grpo"](REWARDS, GROUPS)
    for got in (compute_advantages(REWARDS, GROUPS, "grpo"), weight_negative_advantages(raw, 1.0)):
        assert [a.hex() for a in got] == [a.hex() for a in raw]


def episodes() -> list[Trajectory]:
    return [
        Trajectory("t", group, [5], [1], [0.0], [0], 0, reward=reward, outcome=reward)
        for group, reward in zip(GROUPS, REWARDS, strict=True)
    ]


def run_advantages(overrides: list[str]) -> list[float]:
    cfg = load_config("configs/smoke.yaml", ["train.negative_advantage_weight=1", *overrides])
    return shape_rewards(RewardShaper(cfg.reward), episodes(), cfg)[1]


def test_a_run_defaults_to_weight_1_and_its_advantages_are_the_estimators():
    cfg = load_config("configs/smoke.yaml", ["train.negative_advantage_weight=1"])
    assert Config().train.negative_advantage_weight == 1.0  # the key's default; the smoke config sets 0.25
    shaped = episodes()
    RewardShaper(cfg.reward).shape(shaped)
    raw = ADVANTAGE_ESTIMATORS[cfg.train.advantage](
        [t.reward for t in shaped],
        GROUPS,
        outcomes=[t.outcome for t in shaped],
        outcome_scale=cfg.reward.outcome_gap,
    )
    assert [a.hex() for a in run_advantages([])] == [a.hex() for a in raw]


def test_a_runs_advantages_take_the_configured_weight():
    plain = run_advantages([])
    assert run_advantages(["train.negative_advantage_weight=0.5"]) == [a * 0.5 if a < 0 else a for a in plain]
    smoke_cfg = load_config("configs/smoke.yaml")
    smoke = shape_rewards(RewardShaper(smoke_cfg.reward), episodes(), smoke_cfg)[1]
    assert smoke == [a * 0.25 if a < 0 else a for a in plain]  # the smoke config's own weight


def test_subagents_advantages_take_the_weight_too():
    def team() -> Trajectory:
        helpers = []
        for success in (True, False, False):
            helper = Trajectory("t", "g/sub", [1, 2], [0, 1], [0.0, 0.0], [-1, 0], 1, turns=[Turn(1, 2, 2)],
                                success=success, parent_turn=0)  # fmt: skip
            helper.outcome = helper.reward = float(success)
            helpers.append(helper)
        return Trajectory("t", "g", [1, 2], [0, 1], [0.0, 0.0], [-1, 0], 1, turns=[Turn(1, 2, 2)],
                          success=True, subagents=helpers)  # fmt: skip

    def subagent_advantages(overrides: list[str]) -> list[float]:
        samples = to_samples([team()], [1.0], load_config("configs/swarm.yaml", overrides))
        return [s.advantage for s in samples[1:]]

    plain = subagent_advantages([])
    assert min(plain) < 0 < max(plain)
    weighted = subagent_advantages(["train.negative_advantage_weight=0.25"])
    assert weighted == [a * 0.25 if a < 0 else a for a in plain]


@pytest.mark.parametrize(
    ("value", "message"),
    [("0", "greater than 0"), ("-0.5", "greater than 0"), ("inf", "finite"), ("nan", "finite")],
)
def test_a_weight_that_is_not_a_finite_number_above_0_is_refused(value, message):
    with pytest.raises(ConfigError, match=rf"train\.negative_advantage_weight: .*{message}"):
        load_config("configs/smoke.yaml", [f"train.negative_advantage_weight={value}"])


@pytest.mark.parametrize("weight", [0.0, -1.0, float("inf"), float("nan")])
def test_compute_advantages_refuses_a_weight_that_is_not_a_finite_number_above_0(weight):
    with pytest.raises(ValueError, match="negative advantage weight"):
        compute_advantages(REWARDS, GROUPS, "grpo", negative_weight=weight)
