"""Synchronous RL: each step plays `tasks_per_step` groups on the workers, trains on them,
and gives every worker the new weights before the next step starts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from forge.config import Config
from forge.failures import FailureWatch, env_watches
from forge.run.context import (
    Run,
    RunResult,
    StepLog,
    checkpoint_due,
    finish,
    open_run,
    step_metrics,
    to_samples,
)
from forge.run.held_out import evaluation_due, held_out_metrics, held_out_tasks
from forge.run.rounds import play_step


def train_sync(
    cfg: Config, output_dir: str | Path | None = None, progress: bool | None = None, resume: bool = False
) -> RunResult:
    """Run `cfg.train.max_steps` sync steps (continuing a checkpoint with `resume`); write
    metrics, checkpoints and a final checkpoint."""
    import ray

    started = time.perf_counter()
    output = Path(output_dir or cfg.output_dir)
    held_out = held_out_tasks(cfg)
    run, done, _ = open_run(cfg, output, resume)
    log = StepLog(cfg, output, progress, "train", done)
    failures, signal = env_watches(cfg, from_scratch=done == 0)
    step = done
    try:
        for step in range(done + 1, cfg.train.max_steps + 1):
            metrics = sync_step(run, step, failures, log, started, held_out)
            signal.observe(step, metrics, last_step=step == cfg.train.max_steps)
        checkpoint = Path(ray.get(run.trainer.save.remote(str(output / "final"))))
    finally:
        try:
            log.close()  # a full disk fails it again: the actors are shut down still
        finally:
            run.shutdown()
    return finish(output, step, checkpoint, started)


def sync_step(
    run: Run,
    step: int,
    failures: FailureWatch,
    log: StepLog,
    started: float,
    held_out: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Play one step's episodes (in rounds, `forge.run.rounds`), train on them, sync the
    weights, evaluate the new weights on the `held_out` tasks when due (`eval.every_steps`),
    record it and checkpoint when due; returns its metrics."""
    import ray

    cfg = run.cfg
    step_started = time.perf_counter()
    episodes = play_step(run, step)
    trajectories = episodes.played
    rollout_seconds = time.perf_counter() - step_started

    def record_stopped() -> None:  # the step that stops the run: its episodes, nothing trained
        timings = {"rollout_seconds": rollout_seconds, "step_seconds": time.perf_counter() - step_started,
                   "wall_seconds": time.perf_counter() - started}  # fmt: skip
        log.record(
            step, step_metrics(trajectories, timings, swarm=cfg.swarm.enabled), trajectories, run.tokenizer
        )

    failures.observe(step, trajectories, last_step=step == cfg.train.max_steps, before_stop=record_stopped)

    samples = to_samples(episodes.trained, episodes.advantages, cfg)
    train_metrics, *published = ray.get(run.trainer.train_and_publish.remote(samples))
    sync_started = time.perf_counter()
    version = run.sync_weights(tuple(published))
    sync_seconds = time.perf_counter() - sync_started
    evaluation: dict[str, float] = {}
    if held_out and evaluation_due(step, cfg.eval.every_steps, cfg.train.max_steps):
        evaluation = held_out_metrics(run, held_out, cfg.eval.episodes)

    timings = {
        "rollout_seconds": rollout_seconds,
        "sync_seconds": sync_seconds,
        "policy_version": float(version),
        "step_seconds": time.perf_counter() - step_started,
        "wall_seconds": time.perf_counter() - started,
        **(run.engines.engine_metrics() if run.engines is not None else {}),
    }
    metrics = step_metrics(
        trajectories,
        episodes.reward_metrics,
        episodes.metrics,
        train_metrics,
        timings,
        evaluation,
        swarm=cfg.swarm.enabled,
    )
    log.record(
        step, metrics, trajectories, run.tokenizer, turns=f"{metrics.get('turns_mean', float('nan')):.1f}"
    )
    if checkpoint_due(step, cfg.train.checkpoint_every, cfg.train.max_steps):
        from forge.train.checkpoint import save_run

        save_run(run, step, cfg.train.keep_checkpoints)
    return metrics
