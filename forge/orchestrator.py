"""Wires rollout workers, reward shaping and the trainer into a training run.

Holds no algorithm: workers (Ray actors) play episodes, `forge.reward` turns outcomes
into advantages, the trainer (a Ray actor) steps and publishes versioned weights.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from forge.config import Config
from forge.metrics import MetricsLogger, rollout_metrics
from forge.types import Sample, Trajectory


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    checkpoint: Path
    wall_seconds: float


def start_ray(num_cpus: int | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray once per process."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
    )


class TaskStream:
    """Cycles through the task rows in a seeded shuffled order, epoch after epoch."""

    def __init__(self, tasks: list[dict[str, Any]], seed: int) -> None:
        import random

        if not tasks:
            raise ValueError("the env produced no tasks; check env.tasks or env.num_tasks")
        self.tasks = tasks
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.position = 0

    def take(self, count: int) -> list[dict[str, Any]]:
        taken = []
        while len(taken) < count:
            if self.position >= len(self.order):
                self.order = list(range(len(self.tasks)))
                self.rng.shuffle(self.order)
                self.position = 0
            taken.append(self.tasks[self.order[self.position]])
            self.position += 1
        return taken


def split_evenly(items: list[Any], parts: int) -> list[list[Any]]:
    """Contiguous near-equal chunks (whole tasks per worker, so groups stay on one worker)."""
    base, extra = divmod(len(items), parts)
    chunks, start = [], 0
    for index in range(parts):
        size = base + (1 if index < extra else 0)
        chunks.append(items[start : start + size])
        start += size
    return chunks


def load_task_rows(cfg: Config) -> list[dict[str, Any]]:
    from forge.env.registry import resolve_env
    from forge.env.tasks import load_tasks

    env_class = resolve_env(cfg.env.name)
    dataset = load_tasks(env_class, cfg.env.tasks, cfg.env.num_tasks, cfg.seed, **cfg.env.kwargs)
    return [dict(row) for row in dataset]


def to_samples(trajectories: list[Trajectory], advantages: list[float]) -> list[Sample]:
    """Training samples from every episode that is learning signal (not lost)."""
    return [
        Sample.from_trajectory(t, a)
        for t, a in zip(trajectories, advantages, strict=True)
        if t.status != "lost" and t.generated_tokens > 0
    ]


class Run:
    """One training run's actors and bookkeeping."""

    def __init__(self, cfg: Config, output_dir: Path) -> None:
        import ray

        from forge.models.loading import resolve_model_path
        from forge.reward.shaping import RewardShaper
        from forge.rollout.worker import RolloutWorker
        from forge.train.trainer import Trainer

        self.cfg = cfg
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.model_path = resolve_model_path(cfg.model, output_dir / "initial_model", seed=cfg.seed)
        self.tasks = TaskStream(load_task_rows(cfg), cfg.seed)
        self.shaper = RewardShaper(cfg.reward)

        trainer_threads = max(1, int(cfg.train.num_cpus))
        self.trainer = (
            ray.remote(Trainer)
            .options(num_cpus=cfg.train.num_cpus, num_gpus=cfg.train.num_gpus)
            .remote(str(self.model_path), cfg.model, cfg.train, cfg.trainer, cfg.seed, trainer_threads)
        )
        worker_class = ray.remote(RolloutWorker)
        self.workers = [
            worker_class.options(
                num_cpus=cfg.rollout.num_cpus_per_worker, num_gpus=cfg.rollout.num_gpus_per_worker
            ).remote(
                str(self.model_path), cfg.model, cfg.env, cfg.rollout, cfg.reward.success_threshold,
                cfg.seed + 1000 * (index + 1), 1, cfg.sandbox.min_level,
            )
            for index in range(cfg.rollout.num_workers)
        ]
        from forge.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(self.model_path)

    def rollout(self) -> list[Trajectory]:
        import ray

        tasks = self.tasks.take(self.cfg.rollout.tasks_per_step)
        chunks = split_evenly(tasks, len(self.workers))
        calls = [
            worker.rollout.remote(chunk, self.cfg.rollout.group_size)
            for worker, chunk in zip(self.workers, chunks, strict=True)
            if chunk
        ]
        return [t for batch in ray.get(calls) for t in batch]

    def sync_weights(self) -> int:
        import ray

        wrapped, version = ray.get(self.trainer.publish_weights.remote())
        # The ObjectRef goes to each worker as a top-level argument: Ray resolves it there,
        # so the weights are put once and fetched by every worker from the object store.
        ray.get([worker.set_weights.remote(wrapped[0], version) for worker in self.workers])
        return version

    def shutdown(self) -> None:
        import ray

        for actor in [*self.workers, self.trainer]:
            ray.kill(actor)


def train(
    cfg: Config, output_dir: str | Path | None = None, progress: bool | None = None, resume: bool = False
) -> RunResult:
    """Run `cfg.train.max_steps` steps of sync RL; write metrics and a final checkpoint.

    With `resume`, continue from the latest checkpoint in the output directory."""
    if cfg.gateway.enabled:  # agent programs play the episodes through the HTTP gateway
        from forge.config import ConfigError
        from forge.gateway.training import train_gateway

        if resume:
            raise ConfigError("gateway runs (gateway.enabled: true) cannot resume yet; start a fresh run")
        if cfg.train.mode != "sync":
            raise ConfigError("gateway runs train in sync mode only; set train.mode: sync")

        return train_gateway(cfg, output_dir, progress)
    import ray
    from tqdm import tqdm

    from forge.reward.shaping import trajectory_advantages
    from forge.sandbox import set_min_level

    started = time.perf_counter()
    output = Path(output_dir or cfg.output_dir)
    sandbox_level = set_min_level(cfg.sandbox.min_level)  # fail closed before starting anything
    logging.getLogger("forge").info("sandbox level %d available (min_level %d)", sandbox_level, cfg.sandbox.min_level)
    start_ray()
    run = Run(cfg, output)
    first_step = 1
    if resume:
        from forge.train.checkpoint import restore_run

        first_step = restore_run(run) + 1
    logger = MetricsLogger(output, cfg.logging.tensorboard, cfg.logging.wandb_project, cfg.to_dict())
    show_progress = cfg.logging.progress_bar if progress is None else progress
    bar = tqdm(total=cfg.train.max_steps, desc="train", unit="step", disable=not show_progress,
               initial=first_step - 1)
    step = first_step - 1
    try:
        for step in range(first_step, cfg.train.max_steps + 1):
            rollout_started = time.perf_counter()
            trajectories = run.rollout()
            rollout_seconds = time.perf_counter() - rollout_started

            reward_metrics = run.shaper.shape(trajectories)
            advantages = trajectory_advantages(
                trajectories, cfg.train.advantage, cfg.train.advantage_std, cfg.reward.outcome_gap
            )
            samples = to_samples(trajectories, advantages)
            train_metrics = ray.get(run.trainer.train_step.remote(samples))
            sync_started = time.perf_counter()
            version = run.sync_weights()

            metrics = rollout_metrics(trajectories)
            metrics.update(reward_metrics)
            metrics.update(train_metrics)
            metrics.update(
                rollout_seconds=rollout_seconds,
                sync_seconds=time.perf_counter() - sync_started,
                policy_version=float(version),
                wall_seconds=time.perf_counter() - started,
            )
            logger.log(step, metrics)
            logger.log_trajectories(step, trajectories, run.tokenizer, cfg.logging.trajectory_samples)
            bar.set_postfix(
                reward=f"{metrics.get('reward_mean', float('nan')):.3f}",
                success=f"{metrics.get('success_rate', float('nan')):.2f}",
                turns=f"{metrics.get('turns_mean', float('nan')):.1f}",
            )
            bar.update(1)
            every = cfg.train.checkpoint_every
            if every and (step % every == 0 or step == cfg.train.max_steps):
                from forge.train.checkpoint import save_run

                save_run(run, step, cfg.train.keep_checkpoints)
        checkpoint = Path(ray.get(run.trainer.save.remote(str(output / "final"))))
    finally:
        bar.close()
        logger.close()
        run.shutdown()
    summary = {"steps": step, "checkpoint": str(checkpoint), "wall_seconds": time.perf_counter() - started}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(output, step, checkpoint, summary["wall_seconds"])
