"""Invariants of shaped rewards and the advantages built on them (hypothesis)."""

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from forge.config import RewardConfig
from forge.reward.advantages import ADVANTAGE_ESTIMATORS
from forge.reward.shaping import RewardShaper, trajectory_advantages
from forge.types import Trajectory, Turn


@st.composite
def reward_configs(draw):
    enabled = draw(st.lists(st.booleans(), min_size=4, max_size=4))
    # No subnormals: w * budget / total rounds to w / total = 1 for w = 5e-324.
    raw = draw(st.lists(st.floats(0.0, 1.0, allow_subnormal=False), min_size=4, max_size=4))
    budget = draw(st.floats(0.0, 0.99))  # the enabled weights' sum
    total = sum(w for w, on in zip(raw, enabled, strict=True) if on) or 1.0
    weights = [w / total * budget for w in raw]
    max_tokens = draw(st.integers(1, 300))
    return RewardConfig.model_validate(
        {
            "outcome_gap": draw(st.floats(0.01, 5.0)),
            "speed": {
                "enabled": enabled[0],
                "weight": weights[0],
                "measure": draw(
                    st.sampled_from(["turns", "generated_tokens", "wall_seconds", "tool_seconds"])
                ),
                "baseline": draw(st.sampled_from(["group_median", "task_moving_average", "fixed"])),
                "fixed_baseline": draw(st.floats(0.01, 50.0)),
                "moving_average_decay": draw(st.floats(0.0, 0.99)),
                "h": draw(st.sampled_from(["linear", "exponential", "sigmoid"])),
                "sharpness": draw(st.floats(0.1, 50.0)),
                "apply_to": draw(st.sampled_from(["success", "all"])),
            },
            "length_penalty": {"enabled": enabled[1], "weight": weights[1]},
            "overlong": {
                "enabled": enabled[2],
                "weight": weights[2],
                "max_tokens": max_tokens,
                "buffer_tokens": draw(st.integers(1, max_tokens)),
            },
            "turn_discount": {
                "enabled": enabled[3],
                "weight": weights[3],
                "gamma": draw(st.floats(0.01, 1.0)),
            },
        }
    )


@st.composite
def batches(draw, outcome_gap):
    """Episodes whose successes score at least `outcome_gap` above every failure."""
    failure_top = draw(st.floats(-2.0, 2.0))
    episodes = []
    for _ in range(draw(st.integers(1, 16))):
        success = draw(st.booleans())
        if success:
            outcome = failure_top + outcome_gap + draw(st.floats(0.0, 2.0))
        else:
            outcome = failure_top - draw(st.floats(0.0, 2.0))
        turns = draw(st.integers(0, 12))
        tokens = draw(st.integers(0, 400))
        mask = [0] + [1] * tokens
        episodes.append(
            Trajectory(
                task_id=draw(st.sampled_from(["t0", "t1"])),
                group_id=draw(st.sampled_from(["g0", "g1", "g2"])),
                token_ids=[0] * len(mask),
                loss_mask=mask,
                behaviour_logprobs=[0.0] * len(mask),
                policy_versions=[0] * len(mask),
                prompt_length=1,
                turns=[Turn(0, 0, 0, env_seconds=draw(st.floats(0.0, 30.0))) for _ in range(turns)],
                outcome=outcome,
                success=success,
                status=draw(st.sampled_from(["ok", "ok", "truncated", "error", "lost"])),
                wall_seconds=draw(st.floats(0.0, 600.0)),
            )
        )
    return episodes


@st.composite
def shaped_batches(draw):
    config = draw(reward_configs())
    shaper = RewardShaper(config)
    # two batches through one shaper, so moving-average baselines carry over
    shaper.shape(draw(batches(config.outcome_gap)))
    batch = draw(batches(config.outcome_gap))
    shaper.shape(batch)
    return config, [t for t in batch if t.status != "lost"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shaped_batches())
def test_any_success_outranks_any_failure(shaped):
    _, live = shaped
    successes = [t.reward for t in live if t.success]
    failures = [t.reward for t in live if not t.success]
    if successes and failures:
        assert min(successes) > max(failures)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(shaped_batches(), st.sampled_from(sorted(ADVANTAGE_ESTIMATORS)))
def test_within_a_group_every_success_has_a_higher_advantage_than_every_failure(shaped, estimator):
    config, live = shaped
    advantages = trajectory_advantages(live, estimator, outcome_gap=config.outcome_gap)
    for group in {t.group_id for t in live}:
        members = [(a, t.success) for a, t in zip(advantages, live, strict=True) if t.group_id == group]
        successes = [a for a, won in members if won]
        failures = [a for a, won in members if not won]
        if successes and failures:
            assert min(successes) > max(failures)
