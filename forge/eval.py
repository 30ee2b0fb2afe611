"""`forge eval CONFIG --checkpoint DIR`: play N episodes per task with a saved model and
summarise success, turns, generated tokens and wall time per task as one JSON object."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from forge.config import Config
from forge.types import Trajectory

ON_LOOP = (
    "it ran inline on the event loop (the env sets blocking = False) inside C code, which the watchdog cannot "
    "interrupt, so nothing else could run; an env whose calls can block must leave `blocking` True"
)


def task_summary(trajectories: list[Trajectory], wall_seconds: float, swarm: bool = False) -> dict[str, Any]:
    """Success, turns, tokens and wall time of a task's episodes; with `swarm`, also the
    agent-cluster measures (`forge.metrics.swarm_metrics`)."""
    played = [t for t in trajectories if t.status != "lost"]
    extra: dict[str, Any] = {}
    if swarm:
        from forge.metrics import swarm_metrics

        extra = swarm_metrics(played)
    return {
        "episodes": len(played),
        "episodes_lost": len(trajectories) - len(played),
        "success_rate": statistics.fmean(t.success for t in played) if played else None,
        "turns_mean": statistics.fmean(t.num_turns for t in played) if played else None,
        "generated_tokens_mean": statistics.fmean(t.generated_tokens for t in played) if played else None,
        "wall_seconds": wall_seconds,
        **extra,
    }


def evaluate(
    cfg: Config, checkpoint: str | Path, episodes: int, num_tasks: int, progress: bool = True
) -> dict[str, Any]:
    """Play `episodes` episodes of each of the first `num_tasks` tasks of `cfg.env` in this
    process with the model saved in `checkpoint` (a `forge train` output's `final/`)."""
    from tqdm import tqdm

    from forge.env.registry import resolve_env
    from forge.rollout.stuck import LoopGuard, remove_unused_reports, stuck_limit_s
    from forge.rollout.stuck_watch import StuckWatcher, env_source_file
    from forge.rollout.worker import RolloutWorker
    from forge.run.context import start_sandbox
    from forge.run.tasks import load_task_rows

    checkpoint = Path(checkpoint)
    if not (checkpoint / "config.json").is_file():
        raise FileNotFoundError(
            f"--checkpoint {checkpoint} is not a model folder (no config.json); "
            "pass a run's final/ folder or any save_pretrained checkpoint"
        )
    start_sandbox(cfg)  # says the level; untrusted code is refused at level 0 unless allowed
    model_cfg = cfg.model.model_copy(
        update={"path": str(checkpoint), "lora": cfg.model.lora.model_copy(update={"enabled": False})}
    )  # final/ holds merged weights
    worker = RolloutWorker(str(checkpoint), model_cfg, cfg.env, cfg.rollout, cfg.reward.success_threshold, cfg.seed,
                           sandbox_cfg=cfg.sandbox, swarm_cfg=cfg.swarm)  # fmt: skip
    # An env call stuck in C code (blocking = False, or holding the GIL) ends the eval with
    # exit code 1 instead of hanging it (forge.rollout.stuck), every thread's stack written
    # to a file, and a watcher process says which call was stuck and where.
    report_dir = Path(tempfile.mkdtemp(prefix="forge-eval-"))
    worker.guard = LoopGuard(report_dir, "eval", stuck_limit_s(cfg.env.step_timeout_s))
    env_file = env_source_file(resolve_env(cfg.env.name))
    watcher = StuckWatcher(
        worker.guard.report_path(), cfg.env.name, env_file, cfg.env.step_timeout_s, "forge eval", ON_LOOP
    )
    tasks = load_task_rows(cfg)[:num_tasks]
    started = time.perf_counter()
    per_task: dict[str, Any] = {}
    everything: list[Trajectory] = []
    try:
        for index, task in enumerate(tqdm(tasks, desc="eval", unit="task", disable=not progress)):
            task_started = time.perf_counter()
            trajectories = asyncio.run(worker.rollout([task], episodes))
            per_task[str(task.get("task_id", index))] = task_summary(
                trajectories, time.perf_counter() - task_started, cfg.swarm.enabled
            )
            everything.extend(trajectories)
    finally:
        worker.guard.close()
        watcher.close()
        remove_unused_reports(report_dir)
    overall = task_summary(everything, time.perf_counter() - started, cfg.swarm.enabled)
    return {
        "checkpoint": str(checkpoint),
        "env": cfg.env.name,
        "tasks": len(tasks),
        "episodes_per_task": episodes,
        "sandbox_level": cfg.sandbox.level,
        **overall,
        "per_task": per_task,
    }
