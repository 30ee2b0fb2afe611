"""Held-out evaluation during a run (`eval.*`): the policy just published plays a task file's
episodes on the rollout workers after a step (sync runs: between steps; async runs: beside
the training groups in flight); nothing of it is trained on."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from forge.config import Config, ConfigError
from forge.metrics import rollout_metrics
from forge.pool import generated_versions
from forge.run.faults import collect_groups, lost_group
from forge.run.tasks import split_evenly

if TYPE_CHECKING:
    from forge.run.context import Run
    from forge.types import Trajectory

# What an eval row reports: the played episodes' outcome, not the shaped reward (shaping
# compares a training group's episodes, and a held-out set has no such groups).
EVAL_METRICS = (
    "episodes", "episodes_error", "episodes_truncated", "episodes_lost", "outcome_mean", "success_rate", "turns_mean",
)  # fmt: skip


def held_out_tasks(cfg: Config) -> list[dict[str, Any]] | None:
    """The held-out rows to play (`eval.tasks`, its first `eval.num_tasks`), or None when the
    run does not evaluate. Read before Ray starts, so a wrong file stops the run there."""
    if not cfg.eval.every_steps:
        return None
    from forge.env.tasks import tasks_from

    try:
        rows = [dict(row) for row in tasks_from(cfg.eval.tasks)]
    except ValueError as exc:
        raise ConfigError(str(exc).replace("env.tasks=", "eval.tasks=")) from exc
    return rows[: cfg.eval.num_tasks] if cfg.eval.num_tasks else rows


def evaluation_due(step: int, every_steps: int, max_steps: int) -> bool:
    return every_steps > 0 and (step % every_steps == 0 or step == max_steps)


def held_out_metrics(
    run: Run, tasks: list[dict[str, Any]], episodes: int, workers: list[int] | None = None
) -> dict[str, float]:
    """Play `episodes` of each task on the workers (whole tasks per worker; `workers`, their
    indices, or all) and return the eval/* metrics, its wall time (eval/seconds) included; a
    worker that dies loses its episodes (counted in eval/episodes_lost). With no worker to
    play them, every episode is lost."""
    started = time.perf_counter()
    trajectories = play_held_out(run, tasks, episodes, workers)
    return {**eval_metrics(trajectories), "eval/seconds": time.perf_counter() - started}


def play_held_out(
    run: Run, tasks: list[dict[str, Any]], episodes: int, workers: list[int] | None
) -> list[Trajectory]:
    playing = list(range(len(run.workers))) if workers is None else workers
    if not playing:
        lost = [lost_group(task, episodes, "no rollout worker was up to play it") for task in tasks]
        return [t for group in lost for t in group]
    calls = [
        (index, run.workers[index].rollout.remote(chunk, episodes), chunk)
        for index, chunk in zip(playing, split_evenly(tasks, len(playing)), strict=True)
        if chunk
    ]
    trajectories = []
    for index, ref, chunk in calls:
        groups, died = collect_groups(ref, chunk, episodes)
        if died:
            run.tell_worker_death(index, len(chunk) * episodes)
        trajectories.extend(t for group in groups for t in group)
    return trajectories


def eval_metrics(trajectories: list[Trajectory]) -> dict[str, float]:
    """eval/* of the held-out episodes, with the policy versions that generated their tokens:
    eval/policy_version the oldest, eval/policy_version_spread the newest less the oldest (0:
    one version played them all)."""
    metrics = rollout_metrics(trajectories)
    evaluation = {f"eval/{name}": metrics[name] for name in EVAL_METRICS if name in metrics}
    versions = generated_versions(trajectories)
    if versions:
        evaluation["eval/policy_version"] = float(min(versions))
        evaluation["eval/policy_version_spread"] = float(max(versions) - min(versions))
    return evaluation
