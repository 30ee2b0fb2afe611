"""Reward shaping: total reward = outcome + bounded shaping terms (speed, Kimi length
penalty, DAPO overlong penalty, per-turn discount, PARL's spawn and finish terms for agent
clusters), and the advantages built on it.

Each term is a pure function onto a fixed range of width 1, scaled by `weight *
outcome_gap`; the config keeps the enabled weights' sum below 1. So shaping moves a
reward by less than the outcome gap and any success outranks any failure, by construction.

Why shaping enters the advantage through the outcome's spread (`advantage_std="outcome"`):
std-normalised GRPO divides each group by its own reward spread. In a group where every
episode succeeds, the only spread left is the shaping term, so a 0.02 speed difference
becomes a +-1 advantage, as large as success versus failure. Once most groups succeed,
most of the gradient is speed noise (finishing early is largely luck of the secret, not
strategy), which drowns the success signal. Worse, slow episodes have more tokens, so under
a token-mean loss an all-success group's +-1 advantages sum to a net push down on the
tokens all its episodes share (the behaviour that makes them succeed), about as strong
as the push a group with failures gives. That is how a naive turn bonus collapsed a
prototype's success rate from 1.0 to 0.2. Dividing by the outcome spread (or the outcome
gap where outcomes are all equal) keeps a speed advantage as small as its weight.

The ordering invariant is necessary, not sufficient: in expectation a policy may still
trade success for speed. A strategy that earns the full speed bonus w with success
probability p beats a slow one that always succeeds once p (1 + w) > 1, i.e. it may give
up to w / (1 + w) of its successes (17% at w = 0.2, 47% at w = 0.9). Keep the speed weight
small unless, as in bench/speed_shaping.py (w = 0.9), the fast strategy never fails. That
bound is for the optimum; learning dynamics can lose more. An older bench/speed_shaping.py
setup (n=8, 16 turns, pg loss, lr 4e-3, 250 steps, a plain run that had not learned the
task) measured: w = 0.2, turns -14% for success -3 points; w = 0.35, turns -52% for -50
points; w = 0.9, turns -55% for -37 points.

The outcome-spread division keeps a speed advantage small next to success, but once every
group of a batch succeeds the speed term is the batch's only gradient, and Adam rescales
it to full-size steps: its smallness no longer makes the steps small. Constant-lr runs
(shaped and plain alike) could lose success late that way; a cosine learning-rate
schedule (train.lr_schedule) stops it. bench/speed_shaping.py (8 numbers, 16 turns, so
the plain reward is indifferent to speed; cosine decay, 1400 steps, w = 0.9) measures
turns per solved -28% pooled over 4 seeds at no loss of success (0.993 shaped, 0.978
plain); one of the four seeds moved only 6%. Measuring shaping from the group's slowest
success instead of its mean (so no success is ever pushed down) was tried and dropped: it
sharpens the policy into one deterministic guess tree whose failing branches then give
identical, signal-free groups (success stuck near 0.83).

An entropy bonus (train.entropy_coef) does not help here, for the same Adam reason: in a
batch where every group succeeds it is the whole gradient and gets full-size steps, which
knocked a plain run from 1.0 to 0.09 success in 50 steps (numbers in bench/speed_shaping.py).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

from forge.config import RewardConfig
from forge.reward.advantages import compute_advantages
from forge.types import Trajectory

# ---------------------------------------------------------------- pure term functions


def speed_h(x: float, kind: str, sharpness: float = 4.0) -> float:
    """Decreasing map of x = measure / baseline >= 0 onto [0, 1], 0.5 at x = 1."""
    if kind == "linear":
        return min(1.0, max(0.0, 1.0 - x / 2.0))
    if kind == "exponential":
        return 2.0**-x if x < 1e6 else 0.0
    if kind == "sigmoid":
        z = sharpness * (x - 1.0)
        return 1.0 / (1.0 + math.exp(z)) if z < 700 else 0.0
    raise ValueError(f"unknown speed h {kind!r}: use linear, exponential or sigmoid")


def speed_ratio(measure: float, baseline: float) -> float:
    """measure / baseline, with a zero baseline read as 'anything above zero is slow'."""
    if baseline > 0:
        return max(measure, 0.0) / baseline
    return 0.0 if measure <= 0 else math.inf


def kimi_length_values(lengths: Sequence[int], successes: Sequence[bool]) -> list[float]:
    """Kimi k1.5 length reward over one group, in [-0.5, 0.5]: lambda = 0.5 - (len - min) /
    (max - min); successes keep lambda, failures only min(0, lambda). 0 if lengths are equal."""
    shortest, longest = min(lengths), max(lengths)
    if longest == shortest:
        return [0.0] * len(lengths)
    values = []
    for length, success in zip(lengths, successes, strict=True):
        lam = 0.5 - (length - shortest) / (longest - shortest)
        values.append(lam if success else min(0.0, lam))
    return values


def overlong_value(length: int, max_tokens: int, buffer_tokens: int) -> float:
    """DAPO soft overlong penalty in [-1, 0]: 0 up to max - buffer, linear to -1 at max."""
    start = max_tokens - buffer_tokens
    if length <= start:
        return 0.0
    return max(-1.0, (start - length) / buffer_tokens)


def turn_discount_value(turns: int, gamma: float) -> float:
    """gamma^(turns - 1) - 1, in [-1, 0]: what a success loses per turn after the first."""
    return gamma ** max(turns - 1, 0) - 1.0


def parl_values(trajectory: Trajectory, spawn_cap: int) -> tuple[float, float]:
    """PARL's spawn and finish terms in [0, 1]: sub-agents spawned (every level), as a share
    of `spawn_cap`; the share of them that finished (0 when none was spawned)."""
    spawned = trajectory.all_subagents()
    if not spawned:
        return 0.0, 0.0
    finished = sum(sub.success for sub in spawned)
    return min(len(spawned), spawn_cap) / spawn_cap, finished / len(spawned)


def anneal_scale(progress: float | None, anneal_fraction: float) -> float:
    """Linear from 1 at the start of training to 0 at `anneal_fraction` of it; 1 when the
    progress is unknown."""
    if progress is None:
        return 1.0
    return max(0.0, 1.0 - progress / anneal_fraction)


def speed_measure(trajectory: Trajectory, measure: str) -> float:
    if measure == "turns":
        return float(trajectory.num_turns)
    if measure == "critical_steps":
        return float(trajectory.critical_steps)
    if measure == "critical_seconds":
        return float(trajectory.critical_seconds)
    if measure == "generated_tokens":
        return float(trajectory.generated_tokens)
    if measure == "wall_seconds":
        return float(trajectory.wall_seconds)
    if measure == "tool_seconds":
        return float(trajectory.tool_seconds)
    raise ValueError(
        f"unknown speed measure {measure!r}: use turns, generated_tokens, wall_seconds, tool_seconds, "
        "critical_steps or critical_seconds"
    )


# ---------------------------------------------------------------- the shaper


class RewardShaper:
    """Sets `trajectory.reward` for a batch and returns per-term means for logging.

    Stateful only for the `task_moving_average` speed baseline (per task id).
    """

    def __init__(self, config: RewardConfig) -> None:
        self.config = config
        self.task_baselines: dict[str, float] = {}

    def shape(self, trajectories: Sequence[Trajectory], progress: float | None = None) -> dict[str, float]:
        """Fill in `reward` (and `info["reward_terms"]`) of every episode that is not lost.

        `progress` (the step over train.max_steps) anneals the PARL terms' weights.

        Lost episodes (infra failures) get no reward and stay out of group statistics.
        Returns `reward/<term>` means over the shaped episodes, the raw outcome among them.
        Success is `trajectory.success`; the construction assumes a success's outcome is at
        least `outcome_gap` above a failure's.
        """
        live = [t for t in trajectories if t.status != "lost"]
        groups: dict[str, list[Trajectory]] = {}
        for trajectory in live:
            groups.setdefault(trajectory.group_id, []).append(trajectory)

        terms: dict[str, dict[int, float]] = {}
        cfg = self.config
        if cfg.speed.enabled:
            terms["speed"] = self._speed(groups)
        if cfg.length_penalty.enabled:
            values: dict[int, float] = {}
            for members in groups.values():
                lengths = [t.generated_tokens for t in members]
                found = kimi_length_values(lengths, [t.success for t in members])
                values.update({id(t): v for t, v in zip(members, found, strict=True)})
            terms["length_penalty"] = values
        if cfg.overlong.enabled:
            ov = cfg.overlong
            terms["overlong"] = {
                id(t): overlong_value(t.generated_tokens, ov.max_tokens, ov.buffer_tokens) for t in live
            }
        if cfg.turn_discount.enabled:
            gamma = cfg.turn_discount.gamma
            terms["turn_discount"] = {
                id(t): turn_discount_value(t.num_turns, gamma) if t.success else 0.0 for t in live
            }

        parl_scale = anneal_scale(progress, cfg.parl.anneal_fraction)
        if cfg.parl.enabled:
            found = {id(t): parl_values(t, cfg.parl.spawn_cap) for t in live}
            terms["parl_spawn"] = {key: spawn for key, (spawn, _) in found.items()}
            terms["parl_finish"] = {key: finish for key, (_, finish) in found.items()}

        weights = {
            "speed": cfg.speed.weight,
            "length_penalty": cfg.length_penalty.weight,
            "overlong": cfg.overlong.weight,
            "turn_discount": cfg.turn_discount.weight,
            # Annealed weights only shrink, so the budget the config checked still holds.
            "parl_spawn": cfg.parl.spawn_weight * parl_scale,
            "parl_finish": cfg.parl.finish_weight * parl_scale,
        }
        for trajectory in live:
            scaled = {
                name: weights[name] * cfg.outcome_gap * values[id(trajectory)]
                for name, values in terms.items()
            }
            trajectory.reward = trajectory.outcome + sum(scaled.values())
            trajectory.info["reward_terms"] = scaled

        metrics = {"reward/lost_episodes": float(len(trajectories) - len(live))}
        if not live:
            return metrics
        metrics["reward/outcome"] = statistics.fmean(t.outcome for t in live)
        metrics["reward/total"] = statistics.fmean(t.reward for t in live)
        metrics["reward/success_rate"] = statistics.fmean(float(t.success) for t in live)
        for name in terms:
            metrics[f"reward/{name}"] = statistics.fmean(t.info["reward_terms"][name] for t in live)
        if cfg.parl.enabled:
            metrics["reward/parl_weight_scale"] = parl_scale
        return metrics

    def _speed(self, groups: dict[str, list[Trajectory]]) -> dict[int, float]:
        cfg = self.config.speed
        values: dict[int, float] = {}
        observed: dict[str, list[float]] = {}
        for members in groups.values():
            eligible = [t for t in members if cfg.apply_to == "all" or t.success]
            for t in members:
                values[id(t)] = 0.0
            if not eligible:
                continue
            measures = [speed_measure(t, cfg.measure) for t in eligible]
            for t, m in zip(eligible, measures, strict=True):
                observed.setdefault(t.task_id, []).append(m)
            for t, m in zip(eligible, measures, strict=True):
                baseline = self._baseline(t.task_id, measures)
                values[id(t)] = speed_h(speed_ratio(m, baseline), cfg.h, cfg.sharpness)
        if cfg.baseline == "task_moving_average":
            # Update after scoring, so an episode is never measured against itself.
            for task_id, measures in observed.items():
                batch_value = statistics.median(measures)
                old = self.task_baselines.get(task_id)
                decay = cfg.moving_average_decay
                self.task_baselines[task_id] = (
                    batch_value if old is None else decay * old + (1 - decay) * batch_value
                )
        return values

    def _baseline(self, task_id: str, group_measures: list[float]) -> float:
        cfg = self.config.speed
        if cfg.baseline == "fixed":
            assert cfg.fixed_baseline is not None  # checked by the config
            return cfg.fixed_baseline
        if cfg.baseline == "task_moving_average" and task_id in self.task_baselines:
            return self.task_baselines[task_id]
        return statistics.median(group_measures)


def trajectory_advantages(
    trajectories: Sequence[Trajectory],
    estimator: str = "grpo",
    advantage_std: str = "outcome",
    outcome_gap: float = 1.0,
    negative_weight: float = 1.0,
) -> list[float]:
    """One advantage per trajectory from its shaped `reward`; lost episodes get 0.0 and
    take no part in any group (drop them before training). Negative advantages are
    multiplied by `negative_weight` (`train.negative_advantage_weight`).

    `advantage_std="outcome"` makes grpo and reinforce_pp_baseline divide by the spread of
    the raw outcomes (see the module docstring); "reward" is textbook normalisation.
    """
    if advantage_std not in ("outcome", "reward"):
        raise ValueError(f"advantage_std={advantage_std!r}: use 'outcome' or 'reward'")
    live = [i for i, t in enumerate(trajectories) if t.status != "lost"]
    rewards = [trajectories[i].reward for i in live]
    group_ids = [trajectories[i].group_id for i in live]
    knobs: dict[str, object] = {}
    if advantage_std == "outcome" and estimator in ("grpo", "reinforce_pp_baseline"):
        knobs = {"outcomes": [trajectories[i].outcome for i in live], "outcome_scale": outcome_gap}
    found = compute_advantages(rewards, group_ids, estimator, negative_weight=negative_weight, **knobs)
    advantages = [0.0] * len(trajectories)
    for i, advantage in zip(live, found, strict=True):
        advantages[i] = advantage
    return advantages
