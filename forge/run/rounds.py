"""Which groups a step trains on: DAPO's dynamic sampling (`rollout.max_rounds_per_step`).

With `rollout.max_rounds_per_step` at 1 (the default) a sync step plays `tasks_per_step`
groups and trains on all of them. Above 1, a step whose groups have fewer than
`tasks_per_step` with learning signal plays another round, up to that many rounds, and
trains on the first `tasks_per_step` groups with signal, in the order they were played, and
on no other. A group has signal when an episode the loss takes in has an advantage that is
not 0 (`forge.run.context.trained_advantages`): its episodes did not all score alike or,
with `swarm.train_subagents`, its sub-agents did not. So every step trains a full batch of
groups that teach something while the policy still solves some of its tasks and fails
some, instead of a batch that shrinks as it gets better or worse at them; a step that runs
out of rounds trains on the groups with signal it found. A lost group (its worker died) has
no signal either, so a round replaces it too. A round after the first plays as many tasks
as it takes to find the groups still missing at the rate the step found them so far (at
most `tasks_per_step`), so a step that lacks one group plays a few tasks more, not a whole
batch that is mostly thrown away.

Each round shapes every episode played so far afresh, from the shaper as the step found it,
so a speed baseline kept per task (`reward.speed.baseline: task_moving_average`) takes each
episode once, and the step's metrics (success rate, rewards, signal_fraction) are those of
every episode played, not of the ones kept.

An async run has no step to play again: there the driver leaves out each finished group
without signal as it arrives (`has_signal`), freeing its pool slot for another task, up to
`(max_rounds_per_step - 1) x tasks_per_step` groups per batch trained; past that a group
without signal goes to the pool as before, so a policy that solves all or none of its tasks
still trains (its groups are then skipped as zero-advantage) instead of playing forever. The
groups left out count in the metrics of the next step submitted.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

from forge.failures import RunStopped
from forge.run.context import shape_rewards, trained_advantages
from forge.types import Trajectory


@dataclass
class StepEpisodes:
    played: list[Trajectory]  # every episode of every round, in the order played
    trained: list[Trajectory]  # the episodes the step trains on
    advantages: list[float]  # one per trained episode
    reward_metrics: dict[str, float]  # over every episode played
    metrics: dict[str, float] = field(default_factory=dict)  # sampling/*, with rounds above 1


def play_step(run: Any, step: int) -> StepEpisodes:
    """Play step `step`'s episodes on `run`'s workers, in as many rounds as it takes
    (`rollout.max_rounds_per_step`), and pick those it trains on."""
    cfg = run.cfg
    rounds, wanted = cfg.rollout.max_rounds_per_step, cfg.rollout.tasks_per_step
    shaper_before = copy.deepcopy(run.shaper) if rounds > 1 else None
    played: list[Trajectory] = []
    count, tasks_played = wanted, 0
    for round_number in range(1, rounds + 1):
        episodes = run.rollout(count)
        tasks_played += count
        played += episodes
        if played and all(t.status == "lost" for t in played):
            raise RunStopped(f"stopped at step {step}: every episode was lost, e.g. {played[0].error}")
        if round_number > 1:  # each round shapes every episode so far, from the state before the step
            run.shaper = copy.deepcopy(shaper_before)
        reward_metrics, advantages = shape_rewards(run.shaper, played, cfg, step)
        if rounds == 1:
            return StepEpisodes(played, played, advantages, reward_metrics)
        groups = groups_with_signal(played, advantages, cfg)
        if len(groups) >= wanted:
            break
        count = next_round_tasks(wanted - len(groups), len(groups) / tasks_played, wanted)
    kept = set(groups[:wanted])
    chosen = [i for i, t in enumerate(played) if t.group_id in kept]
    metrics = {
        "sampling/rounds": float(round_number),
        "sampling/groups_with_signal": float(len(groups)),
        "sampling/groups_trained": float(len(kept)),
    }
    return StepEpisodes(
        played, [played[i] for i in chosen], [advantages[i] for i in chosen], reward_metrics, metrics
    )


def next_round_tasks(missing: int, signal_rate: float, most: int) -> int:
    """How many tasks the next round plays to find `missing` more groups with signal, at the
    rate the step's rounds found them so far: no more than a round of `most`."""
    if signal_rate <= 0:
        return most
    return min(most, math.ceil(missing / signal_rate))


def has_signal(shaper: Any, group: list[Trajectory], cfg: Any, step: int) -> bool:
    """Whether `group` (one task's episodes) has an episode whose advantage is not 0, shaped
    alone by a copy of the run's `shaper` (the run's own is left as it was)."""
    _, advantages = shape_rewards(copy.deepcopy(shaper), group, cfg, step)
    return bool(groups_with_signal(group, advantages, cfg))


def groups_with_signal(trajectories: list[Trajectory], advantages: list[float], cfg: Any) -> list[str]:
    """The group ids, in the order first played, of the groups with an episode the loss takes
    in (`forge.run.context.trained_advantages`: sub-agents' too) whose advantage is not 0."""
    signal = {
        group for group, advantage in trained_advantages(trajectories, advantages, cfg) if advantage != 0
    }
    return [group for group in dict.fromkeys(t.group_id for t in trajectories) if group in signal]
