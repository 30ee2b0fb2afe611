"""Advantage estimators: one scalar advantage per trajectory from its reward and group.

Each estimator is a pure function over Python floats, kept in one registry so a config
names it (`train.advantage`). `compute_advantages` is the single entry point; it also
weights the negative advantages (`train.negative_advantage_weight`), whatever the estimator.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

AdvantageFn = Callable[..., list[float]]

ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {}


def register_advantage(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        if name in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage estimator {name!r} is already registered")
        ADVANTAGE_ESTIMATORS[name] = fn
        return fn

    return wrap


def _groups(group_ids: Sequence[str]) -> dict[str, list[int]]:
    members: dict[str, list[int]] = {}
    for index, group_id in enumerate(group_ids):
        members.setdefault(group_id, []).append(index)
    return members


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def _std(values: Sequence[float]) -> float:
    """Sample standard deviation (n - 1), as GRPO implementations compute it."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@register_advantage("grpo")
def grpo(
    rewards: Sequence[float],
    group_ids: Sequence[str],
    *,
    eps: float = 1e-6,
    outcomes: Sequence[float] | None = None,
    outcome_scale: float = 1.0,
) -> list[float]:
    """(r - group mean) / (group std + eps); 0 for a lone member or a group with no spread.

    With `outcomes` (the raw env outcomes, before shaping) the divisor is the spread of
    the outcomes instead of the rewards, and `outcome_scale` (the success/failure gap)
    where the outcomes do not vary. Shaping terms then keep the size they were given:
    in a group where every episode succeeds, small speed differences are not blown up
    to advantages as large as success versus failure (see forge/reward/shaping.py).
    """
    advantages = [0.0] * len(rewards)
    for members in _groups(group_ids).values():
        group_rewards = [rewards[i] for i in members]
        reward_std = _std(group_rewards)
        if len(members) < 2 or reward_std <= eps:
            continue
        if outcomes is None:
            scale = reward_std + eps
        else:
            outcome_std = _std([outcomes[i] for i in members])
            scale = outcome_std + eps if outcome_std > eps else outcome_scale
        mean = _mean(group_rewards)
        for i in members:
            advantages[i] = (rewards[i] - mean) / scale
    return advantages


@register_advantage("dr_grpo")
def dr_grpo(rewards: Sequence[float], group_ids: Sequence[str]) -> list[float]:
    """r - group mean (Dr. GRPO drops the std division); 0 for a lone member."""
    advantages = [0.0] * len(rewards)
    for members in _groups(group_ids).values():
        if len(members) < 2:
            continue
        mean = _mean([rewards[i] for i in members])
        for i in members:
            advantages[i] = rewards[i] - mean
    return advantages


@register_advantage("rloo")
def rloo(rewards: Sequence[float], group_ids: Sequence[str]) -> list[float]:
    """r - mean of the other members of the group (leave-one-out); 0 for a lone member."""
    advantages = [0.0] * len(rewards)
    for members in _groups(group_ids).values():
        n = len(members)
        if n < 2:
            continue
        total = sum(rewards[i] for i in members)
        for i in members:
            advantages[i] = rewards[i] - (total - rewards[i]) / (n - 1)
    return advantages


@register_advantage("reinforce_pp_baseline")
def reinforce_pp_baseline(
    rewards: Sequence[float],
    group_ids: Sequence[str],
    *,
    eps: float = 1e-6,
    outcomes: Sequence[float] | None = None,
    outcome_scale: float = 1.0,
) -> list[float]:
    """REINFORCE++-baseline: subtract the group mean, then normalise over the whole batch
    (mean and std of the centred values), which keeps the scale stable across batches.

    `outcomes` / `outcome_scale` choose the divisor as in `grpo`: the batch spread of the
    group-centred outcomes, or `outcome_scale` where that is zero.
    """
    centred = dr_grpo(rewards, group_ids)
    if len(centred) < 2 or _std(centred) <= eps:
        return [0.0] * len(centred)
    if outcomes is None:
        scale = _std(centred) + eps
    else:
        outcome_std = _std(dr_grpo(outcomes, group_ids))
        scale = outcome_std + eps if outcome_std > eps else outcome_scale
    batch_mean = _mean(centred)
    return [(a - batch_mean) / scale for a in centred]


def weight_negative_advantages(advantages: Sequence[float], weight: float) -> list[float]:
    """Each advantage below zero times `weight`; positives and zeros as they are.

    Why: on a task most first episodes fail, the failures' push down on the words they
    tried can outweigh the few successes' push up, and the probability mass freed goes to
    whatever was rarely sampled (the smoke run's byte pieces). A weight below 1 softens it.
    """
    if not (weight > 0 and math.isfinite(weight)):
        raise ValueError(
            f"negative advantage weight {weight!r}: use a finite number above 0 (1 = unweighted)"
        )
    if weight == 1.0:
        return list(advantages)  # untouched, so the default is bit-for-bit the estimator's
    return [a * weight if a < 0 else a for a in advantages]


def compute_advantages(
    rewards: Sequence[float],
    group_ids: Sequence[str],
    estimator: str = "grpo",
    *,
    negative_weight: float = 1.0,
    **knobs: float | Sequence[float] | None,
) -> list[float]:
    """One advantage per trajectory, the negative ones times `negative_weight`. `knobs`
    go to the estimator (e.g. `eps`, `outcomes`)."""
    if len(rewards) != len(group_ids):
        raise ValueError(f"got {len(rewards)} rewards but {len(group_ids)} group ids: pass one each")
    try:
        fn = ADVANTAGE_ESTIMATORS[estimator]
    except KeyError:
        names = ", ".join(sorted(ADVANTAGE_ESTIMATORS))
        raise ValueError(
            f"unknown advantage estimator {estimator!r}: set train.advantage to one of {names}"
        ) from None
    accepted = set(inspect.signature(fn).parameters) - {"rewards", "group_ids"}
    unknown = sorted(set(knobs) - accepted)
    if unknown:
        raise ValueError(
            f"advantage estimator {estimator!r} does not take {', '.join(unknown)}; "
            f"it takes {', '.join(sorted(accepted)) or 'no options'}"
        )
    advantages = fn([float(r) for r in rewards], list(group_ids), **knobs)
    return weight_negative_advantages(advantages, negative_weight)
