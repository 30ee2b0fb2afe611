"""What every run mode shares: the run's actors (`Run`: rollout workers, engines, trainer),
its start and resume, the reward shaping of a step, and the record of its steps.

Holds no algorithm: workers (Ray actors) play episodes, `forge.reward` turns outcomes
into advantages, the trainer (a Ray actor) steps and publishes versioned weights.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from forge.config import Config
from forge.failures import say
from forge.metrics import MetricsLogger, rollout_metrics, show_step
from forge.rollout.stuck import remove_unused_reports
from forge.run.cluster import check_resources, start_ray, worker_cpus
from forge.run.faults import collect_groups, idle_worker_death_note, wait_until_alive, worker_death_note
from forge.run.frozen import check_resumable, frozen_snapshot, keep_snapshot
from forge.run.tasks import TaskStream, load_task_rows, split_evenly
from forge.types import Sample, Trajectory

if TYPE_CHECKING:
    from forge.rollout.engines.router import EngineView


@dataclass
class RunResult:
    """What a finished run did: its output folder, steps, final checkpoint and wall time."""

    output_dir: Path
    steps: int
    checkpoint: Path
    wall_seconds: float


def start_sandbox(cfg: Config) -> int:
    """Apply `sandbox.*` for the run's env (untrusted code never silently at level 0), print
    the level, and record it in cfg (so in config.yaml) for the metrics too."""
    from forge.env.registry import resolve_env
    from forge.sandbox.policy import announce, configure_for_env

    env_class = resolve_env(cfg.env.name)
    level = configure_for_env(cfg.sandbox, env_class, cfg.env.name)
    announce(level, untrusted=getattr(env_class, "runs_untrusted_code", False), env_name=cfg.env.name)
    cfg.sandbox.level = level
    return level


def trainer_arguments(cfg: Config, model_path: Path | str) -> tuple:
    """`Trainer`'s positional arguments for a run: the trained policy is the one its engines
    sample from, at `rollout.temperature`."""
    return (
        str(model_path),
        cfg.model,
        cfg.train,
        cfg.trainer,
        cfg.seed,
        cfg.train.threads,
        cfg.rollout.temperature,
    )


def make_trainer(cfg: Config, model_path: Path | str) -> Any:
    """The trainer actor; with `train.num_trainers > 1` a TrainerGroup that answers like one.
    `model_path`: a folder, or a hub id each trainer process resolves (`actor_model_source`)."""
    import ray

    from forge.models.loading import actor_env
    from forge.train.trainer import Trainer

    trainer_args = trainer_arguments(cfg, model_path)
    env_vars = actor_env(cfg.model)
    if cfg.train.num_trainers > 1:
        from forge.train.group import TrainerGroup

        return TrainerGroup(
            cfg.train.num_trainers,
            cfg.train.num_cpus,
            cfg.train.num_gpus,
            trainer_args,
            {"strategy": cfg.train.strategy, "mixed_precision": cfg.train.mixed_precision},
            env_vars,
        )
    return (
        ray.remote(Trainer)
        .options(
            num_cpus=cfg.train.num_cpus,
            num_gpus=cfg.train.num_gpus,
            **({"runtime_env": {"env_vars": env_vars}} if env_vars else {}),
        )
        .remote(*trainer_args)
    )


def trainer_actors(trainer: Any) -> list[Any]:
    """The Ray actors behind `trainer` (one, or a TrainerGroup's ranks), to kill at shutdown."""
    return list(getattr(trainer, "actors", [trainer]))


class Run:
    """One training run's actors and bookkeeping."""

    def __init__(self, cfg: Config, output_dir: Path) -> None:
        from forge.models.loading import actor_model_source, load_tokenizer, resolve_model_path
        from forge.reward.shaping import RewardShaper

        self.cfg = cfg
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        # This process's folder of the model; the actors get `model_source` and resolve it
        # themselves (a hub id, its commit pinned in cfg, so also in config.yaml).
        self.model_path = resolve_model_path(cfg.model, output_dir / "initial_model", seed=cfg.seed)
        self.model_source = actor_model_source(cfg.model, self.model_path)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.tasks = TaskStream(load_task_rows(cfg), cfg.seed)
        self.shaper = RewardShaper(cfg.reward)
        self.frozen_snapshot = frozen_snapshot(cfg, output_dir)

        check_resources(cfg, cfg.rollout.num_workers)
        self.engines = None
        self.engine_view: EngineView | None = None  # what a worker Ray restarted is told (forge.run.async_)
        if cfg.rollout.engine != "inprocess":  # generation on engine servers (forge.rollout.engines.pool)
            from forge.rollout.engines.pool import EnginePool
            from forge.rollout.engines.router import EngineView

            self.engines = EnginePool.start(cfg, self.model_source)
            self.engine_view = EngineView(urls=list(self.engines.urls))  # version 0: every engine holds it
        self.trainer = make_trainer(cfg, self.model_source)
        # Where a worker whose event loop got stuck writes its stacks before it ends (forge.rollout.stuck).
        self.stuck_report_dir = output_dir.resolve() / "stuck_workers"
        # Reports told already (or left by the run this one resumes).
        self.stuck_reported = {str(path) for path in self.stuck_report_dir.glob("*.txt")}
        self.workers = self._start_workers()
        # Workers Ray restarted (or is restarting), maybe on another node, whose sandbox
        # level the run has not asked again yet (recheck_sandbox_level).
        self.restarted: set[int] = set()
        try:
            self._record_sandbox_level()
        except Exception:
            self.shutdown()
            raise
        self.tokenizer = load_tokenizer(self.model_path)

    def _record_sandbox_level(self) -> None:
        """Each worker probed its own node: the run's level is the lowest, in config.yaml and
        the metrics; a worker whose node gives less than the config allows stops the run here."""
        from forge.run.worker_levels import workers_level
        from forge.sandbox import available_level

        cfg = self.cfg
        driver_level = available_level() if cfg.sandbox.level is None else cfg.sandbox.level
        level = workers_level(self.workers, driver_level, untrusted=self._untrusted(), env_name=cfg.env.name)
        if level != cfg.sandbox.level:
            self._set_sandbox_level(level)

    def _untrusted(self) -> bool:
        """Whether the run's env runs model-written code (what a sandbox level 0 warns of)."""
        from forge.env.registry import resolve_env

        return bool(getattr(resolve_env(self.cfg.env.name), "runs_untrusted_code", False))

    def _set_sandbox_level(self, level: int) -> None:
        """Record `level` as the run's: in cfg (so the steps' `sandbox_level`, StepLog) and config.yaml."""
        self.cfg.sandbox.level = level
        (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.cfg.to_dict(), sort_keys=False))

    def recheck_sandbox_level(self, index: int) -> None:
        """Rollout worker `index` is back from a restart, maybe on another node: if that node
        gives a lower sandbox level than the run's, the run's level drops to it, said once.
        (A node below what the config allows made the worker refuse to restart: the run
        stopped there, forge.run.faults.worker_gone_message.)"""
        import ray
        from ray.exceptions import RayActorError

        from forge.run.worker_levels import restarted_level_note

        try:
            report = ray.get(self.workers[index].sandbox_report.remote())
        except RayActorError:  # died again: told, and asked again, after its next restart
            return
        self.restarted.discard(index)
        if report.level >= self.cfg.sandbox.level:
            return
        say(
            restarted_level_note(
                index, report, self.cfg.sandbox.level, untrusted=self._untrusted(), env_name=self.cfg.env.name
            )
        )
        self._set_sandbox_level(report.level)

    def _start_workers(self) -> list[Any]:
        import ray

        from forge.env.output import env_log_path
        from forge.env.registry import worker_runtime_env
        from forge.models.loading import actor_env
        from forge.rollout.worker import RolloutWorker

        cfg = self.cfg
        worker_class = ray.remote(RolloutWorker)
        # A user's env module found through the working directory or PYTHONPATH: the workers
        # get its folder on their path (on a remote cluster, start_ray shipped it instead).
        runtime_env = (None if os.environ.get("RAY_ADDRESS") else worker_runtime_env(cfg.env.name)) or {}
        to_file = cfg.logging.env_output == "file"
        if to_file:  # said once, before the workers start (their env module imports may print)
            say(
                f"forge: env output (prints, subprocesses' stdout) goes to {env_log_path(self.output_dir, 0).parent}/"
                "worker-N.log, one file per rollout worker (logging.env_output: console shows it here)"
            )
        if hub := actor_env(cfg.model):  # the model is a hub id: resolved as this process does
            runtime_env = {**runtime_env, "env_vars": {**runtime_env.get("env_vars", {}), **hub}}
        return [
            worker_class.options(
                num_cpus=worker_cpus(cfg),
                num_gpus=cfg.rollout.num_gpus_per_worker,
                max_restarts=cfg.async_.max_worker_restarts,  # a dead worker comes back; its episodes are lost
                **({"runtime_env": runtime_env} if runtime_env else {}),
            ).remote(
                self.model_source,
                cfg.model,
                cfg.env,
                cfg.rollout,
                cfg.reward.success_threshold,
                cfg.seed + 1000 * (index + 1),
                None,
                cfg.sandbox,
                self.engines.urls if self.engines is not None else None,
                index,
                cfg.swarm,
                str(self.frozen_snapshot) if self.frozen_snapshot is not None else None,
                str(self.stuck_report_dir),
                str(env_log_path(self.output_dir.resolve(), index)) if to_file else None,
            )
            for index in range(cfg.rollout.num_workers)
        ]

    def rollout(self, count: int | None = None) -> list[Trajectory]:
        """The episodes of `count` tasks (a step's `tasks_per_step` unless given) x `group_size`,
        whole tasks per worker."""
        return self.collect_rollouts(self.launch_rollouts(count))

    def launch_rollouts(self, count: int | None = None) -> list[tuple[Any, list[dict[str, Any]]]]:
        tasks = self.tasks.take(count or self.cfg.rollout.tasks_per_step)
        chunks = split_evenly(tasks, len(self.workers))
        return [
            (worker.rollout.remote(chunk, self.cfg.rollout.group_size), chunk)
            for worker, chunk in zip(self.workers, chunks, strict=True)
            if chunk
        ]

    def collect_rollouts(self, calls: list[tuple[Any, list[dict[str, Any]]]]) -> list[Trajectory]:
        """Gather the launched episodes; a worker that died mid-rollout (Ray restarts it)
        yields its groups as lost episodes, counted but never trained on."""
        trajectories: list[Trajectory] = []
        for index, (ref, chunk) in enumerate(calls):  # calls[i] is worker i's: only trailing chunks are empty
            groups, died = collect_groups(ref, chunk, self.cfg.rollout.group_size)
            if died:
                self.tell_worker_death(index, len(chunk) * self.cfg.rollout.group_size)
            trajectories.extend(t for group in groups for t in group)
        return trajectories

    def tell_worker_death(self, index: int, lost: int) -> None:
        """Say on the console that rollout worker `index` died, losing `lost` episodes, and why if it knows."""
        self.restarted.add(index)
        env = self.cfg.env
        say(
            worker_death_note(
                index, lost, self.stuck_report_dir, self.stuck_reported, env.name, env.step_timeout_s
            )
        )

    def sync_weights(self, published: tuple[list[Any], int] | None = None) -> int:
        """Send every worker the trainer's weights (`published`, as `train_and_publish`
        returned them, or published now) and wait until each has loaded them."""
        import ray

        wrapped, version = published or ray.get(self.trainer.publish_weights.remote())
        if self.engines is not None:  # the engines generate: they get the weights, workers hold none
            self.engines.sync(wrapped, version, self.trainer)
            # The version (vLLM keeps none: its clients stamp it), the servers that took it (a
            # worker takes back an engine it dropped only if it is one of them) and the
            # engines started in place of lost ones.
            self.engine_view = self.engines.view(version)
            self.tell_workers("set_engine_view", self.engine_view)
            return version
        # The ObjectRef goes to each worker as a top-level argument: Ray resolves it there,
        # so the weights are put once and fetched by every worker from the object store.
        self.tell_workers("set_weights", wrapped[0], version)
        self.keep_frozen(version)
        return version

    def tell_workers(self, method: str, *args: Any) -> None:
        """Call `method` on every worker and wait for each; a worker Ray is restarting is
        waited for, then called again (it came back without what the call gives), and its
        sandbox level asked again."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        calls = [(worker, getattr(worker, method).remote(*args)) for worker in self.workers]
        for index, (worker, ref) in enumerate(calls):
            try:
                ray.get(ref)
            except (RayActorError, ActorUnavailableError):
                if index not in self.restarted:  # it died while idle: no rollout call saw it
                    say(idle_worker_death_note(index))
                wait_until_alive(worker, index, self.cfg.async_.max_worker_restarts)
                self.restarted.add(index)
                ray.get(getattr(worker, method).remote(*args))
            if index in self.restarted:  # it answered: it is back
                self.recheck_sandbox_level(index)

    def keep_frozen(self, version: int) -> None:
        """Save the sub-agents' snapshot when the workers reach swarm.frozen_version (forge.run.frozen)."""
        keep_snapshot(self.frozen_snapshot, self.cfg.swarm.frozen_version, version, self.workers[0])

    def shutdown(self) -> None:
        import ray

        closing = [worker.close.remote() for worker in self.workers]
        ray.wait(closing, num_returns=len(closing), timeout=5.0)  # a dead worker just does not answer
        for actor in [*self.workers, *trainer_actors(self.trainer)]:
            ray.kill(actor)
        remove_unused_reports(self.stuck_report_dir)
        if self.engines is not None:
            self.engines.shutdown()


def open_run(cfg: Config, output: Path, resume: bool) -> tuple[Run, int, tuple[list[Any], int] | None]:
    """Start a run's actors (sandbox first: it fails closed before anything starts). With
    `resume`, load the latest checkpoint into them and give the workers its weights.
    Returns the run, the steps already done and the weights published (None when fresh)."""
    import ray

    from forge.train.checkpoint import checkpoint_step, latest_checkpoint, restore_run

    if resume:  # nothing to resume, or no snapshot the sub-agents need: say so before any actor starts
        step = checkpoint_step(latest_checkpoint(output))
        check_resumable(frozen_snapshot(cfg, output), cfg.swarm.frozen_version, step)
    start_sandbox(cfg)
    start_ray(env_name=cfg.env.name)
    run = Run(cfg, output)
    if not resume:
        return run, 0, None
    try:
        step = restore_run(run)
        published = ray.get(run.trainer.publish_weights.remote())
        run.sync_weights(published)
    except Exception:
        run.shutdown()
        raise
    return run, step, published


def shape_rewards(
    shaper: Any, trajectories: list[Trajectory], cfg: Config, step: int | None = None
) -> tuple[dict[str, float], list[float]]:
    """A step's reward metrics and per-episode advantages (`forge.reward`), in every mode alike;
    `step` (the one these episodes train) anneals the terms that fade over the run."""
    from forge.reward.shaping import trajectory_advantages

    progress = None if step is None else (step - 1) / cfg.train.max_steps
    reward_metrics = shaper.shape(trajectories, progress=progress)
    advantages = trajectory_advantages(
        trajectories,
        cfg.train.advantage,
        cfg.train.advantage_std,
        cfg.reward.outcome_gap,
        cfg.train.negative_advantage_weight,
    )
    played = [advantage for _, advantage in trained_advantages(trajectories, advantages, cfg)]
    # The share of episodes there is something to learn from (forge.failures.SignalWatch); 0 with none trained.
    reward_metrics["signal_fraction"] = sum(a != 0 for a in played) / len(played) if played else 0.0
    return reward_metrics, advantages


def trained_advantages(
    trajectories: list[Trajectory], advantages: list[float], cfg: Config
) -> list[tuple[str, float]]:
    """(group id, advantage) of every episode the step's loss takes in (`becomes_sample`: not
    lost, with a token it generated and, with `train.mask_truncated`, no reply cut) and, with
    `swarm.train_subagents`, each such sub-agent, under its orchestrator's group and with its
    own advantage. What
    learning signal is (`signal_fraction`, dynamic sampling's groups with signal): a sub-agent
    whose advantage is not 0 gives its orchestrator's group some, as `to_samples` trains it."""
    masked = cfg.train.mask_truncated
    found = [
        (t.group_id, a) for t, a in zip(trajectories, advantages, strict=True) if becomes_sample(t, masked)
    ]
    if cfg.swarm.train_subagents:
        from forge.rollout.spawn import with_subagents

        trained, own = with_subagents(
            trajectories, advantages, True, cfg.train.advantage, cfg.train.negative_advantage_weight
        )
        # with_subagents lists every sub-agent of each episode not lost, in order.
        roots = [t.group_id for t in trajectories if t.status != "lost" for _ in t.all_subagents()]
        subagents = zip(roots, trained[len(trajectories) :], own[len(trajectories) :], strict=True)
        found += [(root, a) for root, sub, a in subagents if becomes_sample(sub, masked)]
    return found


def becomes_sample(trajectory: Trajectory, mask_truncated: bool) -> bool:
    """Whether an episode (or sub-agent) becomes a training sample: not lost, with a token the
    model generated (one cut off before its first reply has none), and with `mask_truncated`
    no reply cut at its token limit."""
    return (
        trajectory.status != "lost"
        and trajectory.generated_tokens > 0
        and not (mask_truncated and trajectory.reply_cut)
    )


def to_samples(
    trajectories: list[Trajectory], advantages: list[float], cfg: Config | None = None
) -> list[Sample]:
    """Training samples from every episode that is learning signal (not lost; with
    `train.mask_truncated`, no reply cut at `rollout.max_new_tokens`); with
    `swarm.train_subagents`, their sub-agents' too (`forge.rollout.spawn.with_subagents`)."""
    if cfg is not None and cfg.swarm.train_subagents:
        from forge.rollout.spawn import with_subagents

        trajectories, advantages = with_subagents(
            trajectories, advantages, True, cfg.train.advantage, cfg.train.negative_advantage_weight
        )
    masked = cfg is not None and cfg.train.mask_truncated
    return [
        Sample.from_trajectory(t, a)
        for t, a in zip(trajectories, advantages, strict=True)
        if becomes_sample(t, masked)
    ]


def checkpoint_due(step: int, every: int, max_steps: int) -> bool:
    """Whether a checkpoint is written after `step` (`train.checkpoint_every`, and the last step)."""
    return bool(every) and (step % every == 0 or step == max_steps)


def step_metrics(
    trajectories: list[Trajectory], *parts: dict[str, float], swarm: bool = False
) -> dict[str, float]:
    """A step's metrics: its episodes' (`rollout_metrics`, with the agent-cluster ones when
    `swarm`), then each part in order (a later key wins)."""
    metrics = rollout_metrics(trajectories, swarm=swarm)
    for part in parts:
        metrics.update(part)
    return metrics


class StepLog:
    """Where a run records its steps: metrics.jsonl (and TensorBoard, wandb), sampled
    trajectories, and the progress bar."""

    def __init__(self, cfg: Config, output: Path, progress: bool | None, desc: str, done_steps: int) -> None:
        from tqdm import tqdm

        self.logger = MetricsLogger(
            output,
            cfg.logging.tensorboard,
            cfg.logging.wandb_project,
            cfg.to_dict(),
            trajectories_every=cfg.logging.trajectories_every,
        )
        show_progress = cfg.logging.progress_bar if progress is None else progress
        self.bar = tqdm(
            total=cfg.train.max_steps, desc=desc, unit="step", disable=not show_progress, initial=done_steps
        )
        self.sandbox = cfg.sandbox  # read at each step: a worker restarted on a weaker node lowers it
        self.trajectory_samples = cfg.logging.trajectory_samples

    def record(
        self,
        step: int,
        metrics: dict[str, float],
        trajectories: list[Trajectory],
        tokenizer: Any,
        **shown: str,
    ) -> None:
        """Log step `step` (its metrics plus the sandbox level) and advance the bar, showing `shown` too."""
        metrics["sandbox_level"] = float(self.sandbox.level)
        self.logger.record_step(step, metrics, trajectories, tokenizer, self.trajectory_samples)
        show_step(self.bar, metrics, **shown)

    def close(self) -> None:
        self.bar.close()
        self.logger.close()


def finish(output: Path, steps: int, checkpoint: Path, started: float) -> RunResult:
    """Write the run's summary.json and say what it did."""
    summary = {"steps": steps, "checkpoint": str(checkpoint), "wall_seconds": time.perf_counter() - started}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(output, steps, checkpoint, summary["wall_seconds"])
