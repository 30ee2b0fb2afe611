"""Wires rollout workers, reward shaping and the trainer into a training run.

Holds no algorithm: workers (Ray actors) play episodes, `forge.reward` turns outcomes
into advantages, the trainer (a Ray actor) steps and publishes versioned weights.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from forge.config import Config
from forge.failures import FailureWatch
from forge.metrics import MetricsLogger, claim_output_dir, rollout_metrics, show_step
from forge.types import Sample, Trajectory

# Async mode keeps this many training steps submitted to the trainer: one running, one
# queued behind it, so the trainer never waits on the driver between steps.
TRAIN_QUEUE_DEPTH = 2


@dataclass
class RunResult:
    output_dir: Path
    steps: int
    checkpoint: Path
    wall_seconds: float


def start_ray(num_cpus: int | None = None, env_name: str | None = None) -> None:
    """Join the cluster named by RAY_ADDRESS, or start a local Ray once per process. On a
    cluster, the folder of env `env_name` (a `module:Class` not installed as a package) is
    shipped to every node (Ray's `py_modules`)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        from forge.env.registry import env_module_path

        shipped = env_module_path(env_name) if env_name else None
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True,
                 runtime_env={"py_modules": [shipped]} if shipped else None)
        return
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        _system_config=ray_system_config(),
    )


# Ray's GCS server keeps the status and profile events of the last 100,000 tasks (its
# default). A run makes ~5 Ray calls a step, ~3.6 KB of events each, so the GCS grew by
# ~18 KB a step, 350 MB over 20,000 steps, before that cap. 2,000 tasks (the last few
# hundred steps, still listed by `ray list tasks`) bound it at a few MB.
TASK_EVENTS_IN_GCS = 2000


def ray_system_config() -> dict[str, int]:
    """Ray settings for a local cluster Forge starts; a RAY_<name> the user set wins."""
    config = {"task_events_max_num_task_in_gcs": TASK_EVENTS_IN_GCS}
    return {name: value for name, value in config.items() if f"RAY_{name}" not in os.environ}


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
        # Tasks an async run had started but not trained on when it checkpointed: a resumed
        # run plays them first.
        self.requeued: list[dict[str, Any]] = []

    def take(self, count: int) -> list[dict[str, Any]]:
        taken = self.requeued[:count]
        del self.requeued[:count]
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


def check_resources(cfg: Config, rollout_workers: int) -> None:
    """Fail fast when the trainer processes and rollout workers ask for more CPUs or GPUs
    than the Ray cluster has in total: Ray would otherwise wait forever to place them."""
    import ray

    from forge.config import ConfigError

    trainers = cfg.train.num_trainers
    engines = cfg.rollout.num_engines if cfg.rollout.engine == "server" else 0
    wanted = {
        "CPU": trainers * cfg.train.num_cpus + rollout_workers * worker_cpus(cfg)
        + engines * cfg.rollout.num_cpus_per_engine,
        "GPU": trainers * cfg.train.num_gpus + rollout_workers * cfg.rollout.num_gpus_per_worker
        + engines * cfg.rollout.num_gpus_per_engine,
    }
    have = ray.cluster_resources()
    for kind, amount in wanted.items():
        if amount > have.get(kind, 0.0) + 1e-9:
            message = (
                f"this run needs {amount:g} {kind}s (train.num_trainers={trainers} x train.num_{kind.lower()}s="
                f"{getattr(cfg.train, f'num_{kind.lower()}s'):g} + {rollout_workers} rollout workers x "
                f"rollout.num_{kind.lower()}s_per_worker={getattr(cfg.rollout, f'num_{kind.lower()}s_per_worker'):g}) "
                f"but the Ray cluster has {have.get(kind, 0.0):g}; lower those settings or add nodes"
            )
            if os.environ.get("RAY_ADDRESS"):  # an autoscaling cluster may still grow: say so, go on
                logging.getLogger("forge").warning(message)
            else:
                raise ConfigError(message)


def worker_cpus(cfg: Config) -> float:
    """A rollout worker's CPU reservation: none when engines generate for it (it runs envs only)."""
    return cfg.rollout.num_cpus_per_worker if cfg.rollout.engine == "inprocess" else 0.0


def make_trainer(cfg: Config, model_path: Path) -> Any:
    """The trainer actor; with `train.num_trainers > 1` a TrainerGroup that answers like one."""
    import ray

    from forge.train.trainer import Trainer

    trainer_args = (str(model_path), cfg.model, cfg.train, cfg.trainer, cfg.seed, cfg.train.threads)
    if cfg.train.num_trainers > 1:
        from forge.train.group import TrainerGroup

        return TrainerGroup(
            cfg.train.num_trainers, cfg.train.num_cpus, cfg.train.num_gpus, trainer_args,
            {"strategy": cfg.train.strategy, "mixed_precision": cfg.train.mixed_precision},
        )
    return ray.remote(Trainer).options(num_cpus=cfg.train.num_cpus, num_gpus=cfg.train.num_gpus).remote(*trainer_args)


def trainer_actors(trainer: Any) -> list[Any]:
    return list(getattr(trainer, "actors", [trainer]))


class Run:
    """One training run's actors and bookkeeping."""

    def __init__(self, cfg: Config, output_dir: Path) -> None:
        import ray

        from forge.env.registry import worker_runtime_env
        from forge.models.loading import resolve_model_path
        from forge.reward.shaping import RewardShaper
        from forge.rollout.worker import RolloutWorker

        self.cfg = cfg
        self.output_dir = output_dir
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.model_path = resolve_model_path(cfg.model, output_dir / "initial_model", seed=cfg.seed)
        self.tasks = TaskStream(load_task_rows(cfg), cfg.seed)
        self.shaper = RewardShaper(cfg.reward)

        check_resources(cfg, cfg.rollout.num_workers)
        self.engines = None
        if cfg.rollout.engine != "inprocess":  # generation on engine servers (forge.rollout.engines.pool)
            from forge.rollout.engines.pool import EnginePool

            self.engines = EnginePool.start(cfg, self.model_path)
        self.trainer = make_trainer(cfg, self.model_path)
        worker_class = ray.remote(RolloutWorker)
        # A user's env module found through the working directory or PYTHONPATH: the workers
        # get its folder on their path (on a remote cluster, start_ray shipped it instead).
        runtime_env = None if os.environ.get("RAY_ADDRESS") else worker_runtime_env(cfg.env.name)
        self.workers = [
            worker_class.options(
                num_cpus=worker_cpus(cfg), num_gpus=cfg.rollout.num_gpus_per_worker,
                max_restarts=cfg.async_.max_worker_restarts,  # a dead worker comes back; its episodes are lost
                **({"runtime_env": runtime_env} if runtime_env else {}),
            ).remote(
                str(self.model_path), cfg.model, cfg.env, cfg.rollout, cfg.reward.success_threshold,
                cfg.seed + 1000 * (index + 1), None, cfg.sandbox,
                self.engines.urls if self.engines is not None else None, index,
            )
            for index in range(cfg.rollout.num_workers)
        ]
        from forge.models.loading import load_tokenizer

        self.tokenizer = load_tokenizer(self.model_path)

    def rollout(self) -> list[Trajectory]:
        """One step's episodes: `tasks_per_step` tasks x `group_size`, whole tasks per worker."""
        return self.collect_rollouts(self.launch_rollouts())

    def launch_rollouts(self) -> list[tuple[Any, list[dict[str, Any]]]]:
        tasks = self.tasks.take(self.cfg.rollout.tasks_per_step)
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
        for ref, chunk in calls:
            groups, _ = collect_groups(ref, chunk, self.cfg.rollout.group_size)
            trajectories.extend(t for group in groups for t in group)
        return trajectories

    def sync_weights(self, published: tuple[list[Any], int] | None = None) -> int:
        """Send every worker the trainer's weights (`published`, as `train_and_publish`
        returned them, or published now) and wait until each has loaded them."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        wrapped, version = published or ray.get(self.trainer.publish_weights.remote())
        if self.engines is not None:  # the engines generate: they get the weights, workers hold none
            self.engines.sync(wrapped, version, self.trainer)
            for url in self.engines.take_started():  # replacements for lost engines
                ray.get([worker.add_engine.remote(url) for worker in self.workers])
            return version
        # The ObjectRef goes to each worker as a top-level argument: Ray resolves it there,
        # so the weights are put once and fetched by every worker from the object store.
        calls = [(worker, worker.set_weights.remote(wrapped[0], version)) for worker in self.workers]
        for worker, ref in calls:
            try:
                ray.get(ref)
            except (RayActorError, ActorUnavailableError):  # a worker Ray is restarting
                wait_until_alive(worker)
                ray.get(worker.set_weights.remote(wrapped[0], version))
        return version

    def shutdown(self) -> None:
        import ray

        closing = [worker.close.remote() for worker in self.workers]
        ray.wait(closing, num_returns=len(closing), timeout=5.0)  # a dead worker just does not answer
        for actor in [*self.workers, *trainer_actors(self.trainer)]:
            ray.kill(actor)
        if self.engines is not None:
            self.engines.shutdown()


def actor_death_message(exc: BaseException, output_dir: str | Path, config: str | None = None) -> str | None:
    """What to tell the user when a run stops because one of its actors died for good (the
    trainer, or a trainer rank: its state since the last checkpoint is gone), or None when
    `exc` is something else."""
    import re

    from ray.exceptions import RayActorError

    if not isinstance(exc, RayActorError):
        return None
    found = re.search(r"class_name: (\w+)", str(exc))
    who = f"the {found.group(1)} actor" if found else "an actor of the run"
    message = f"{who} died, so the run stopped (its log above says why: often out of memory)."
    from forge.train.checkpoint import CheckpointError, latest_checkpoint

    try:
        latest = latest_checkpoint(output_dir)
    except CheckpointError:
        return message + " No checkpoint was written; set train.checkpoint_every to make runs resumable."
    return message + (f" Continue from {latest.name} with: forge train {config or 'CONFIG'} --resume {output_dir}")


def wait_until_alive(actor: Any, timeout_s: float = 300.0) -> None:
    """Block until a restarting actor answers again; a worker that never comes back stops
    the run with a clear error instead of a hang."""
    import ray
    from ray.exceptions import ActorUnavailableError

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            ray.get(actor.get_policy_version.remote(), timeout=max(deadline - time.monotonic(), 1.0))
            return
        except ActorUnavailableError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"a rollout worker did not come back within {timeout_s:.0f}s of dying") from None
            time.sleep(0.2)


def train(
    cfg: Config, output_dir: str | Path | None = None, progress: bool | None = None, resume: bool = False,
    overwrite: bool = False,
) -> RunResult:
    """Run `cfg.train.max_steps` steps of sync RL; write metrics and a final checkpoint.

    With `resume`, continue from the latest checkpoint in the output directory. Without it,
    an output directory holding an earlier run is refused, or with `overwrite` emptied of it."""
    if not resume:
        claim_output_dir(Path(output_dir or cfg.output_dir), overwrite)
    from forge.rollout.engines.pool import check_engine_config

    check_engine_config(cfg)
    from forge.env.preflight import preflight_env

    preflight_env(cfg.env, cfg.seed)  # a wrong env name, kwargs or reset: one message, before Ray starts
    if cfg.gateway.enabled:  # agent programs play the episodes through the HTTP gateway
        from forge.config import ConfigError
        from forge.gateway.training import train_gateway

        if cfg.train.mode != "sync":
            raise ConfigError("gateway runs train in sync mode only; set train.mode: sync")

        return train_gateway(cfg, output_dir, progress, resume)
    if cfg.train.mode == "async":
        return train_async(cfg, output_dir, progress, resume)
    import ray
    from tqdm import tqdm

    from forge.reward.shaping import trajectory_advantages

    started = time.perf_counter()
    output = Path(output_dir or cfg.output_dir)
    if resume:
        from forge.train.checkpoint import latest_checkpoint

        latest_checkpoint(output)  # nothing to resume: say so before any actor starts
    start_sandbox(cfg)  # fail closed before starting anything
    start_ray(env_name=cfg.env.name)
    run = Run(cfg, output)
    first_step = 1
    if resume:
        from forge.train.checkpoint import restore_run

        try:
            first_step = restore_run(run) + 1
            run.sync_weights()
        except Exception:
            run.shutdown()
            raise
    logger = MetricsLogger(output, cfg.logging.tensorboard, cfg.logging.wandb_project, cfg.to_dict(),
                           trajectories_every=cfg.logging.trajectories_every)
    show_progress = cfg.logging.progress_bar if progress is None else progress
    bar = tqdm(total=cfg.train.max_steps, desc="train", unit="step", disable=not show_progress,
               initial=first_step - 1)
    failures = FailureWatch(cfg.env.max_error_fraction, cfg.env.error_window_steps)
    step = first_step - 1
    try:
        for step in range(first_step, cfg.train.max_steps + 1):
            step_started = rollout_started = time.perf_counter()
            trajectories = run.rollout()
            rollout_seconds = time.perf_counter() - rollout_started
            if trajectories and all(t.status == "lost" for t in trajectories):
                raise RuntimeError(f"step {step}: every episode was lost, e.g. {trajectories[0].error}; the run stops")
            failures.observe(step, trajectories, last_step=step == cfg.train.max_steps)

            reward_metrics = run.shaper.shape(trajectories)
            advantages = trajectory_advantages(
                trajectories, cfg.train.advantage, cfg.train.advantage_std, cfg.reward.outcome_gap
            )
            samples = to_samples(trajectories, advantages)
            train_metrics, *published = ray.get(run.trainer.train_and_publish.remote(samples))
            sync_started = time.perf_counter()
            version = run.sync_weights(tuple(published))

            metrics = rollout_metrics(trajectories)
            metrics.update(reward_metrics)
            metrics.update(train_metrics)
            metrics.update(
                rollout_seconds=rollout_seconds,
                sync_seconds=time.perf_counter() - sync_started,
                policy_version=float(version),
                step_seconds=time.perf_counter() - step_started,
                wall_seconds=time.perf_counter() - started,
            )
            metrics["sandbox_level"] = float(cfg.sandbox.level)
            logger.record_step(step, metrics, trajectories, run.tokenizer, cfg.logging.trajectory_samples)
            show_step(bar, metrics, turns=f"{metrics.get('turns_mean', float('nan')):.1f}")
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


def lost_group(task: dict[str, Any], group_size: int, error: str) -> list[Trajectory]:
    """Stand-ins for the episodes of a group whose worker died: counted, never trained on."""
    task_id = str(task.get("task_id", ""))
    return [
        Trajectory(task_id=task_id, group_id=f"{task_id}@lost", token_ids=[], loss_mask=[], behaviour_logprobs=[],
                   policy_versions=[], prompt_length=0, status="lost", error=error)
        for _ in range(group_size)
    ]


def collect_groups(ref: Any, tasks: list[dict[str, Any]], group_size: int) -> tuple[list[list[Trajectory]], bool]:
    """The episodes of one worker call, one list per task (its group) in launch order; if
    the worker died, lost stand-ins for every group, and True."""
    import ray
    from ray.exceptions import ActorUnavailableError, RayActorError

    try:
        episodes = ray.get(ref)
    except (RayActorError, ActorUnavailableError) as exc:  # Ray restarts the worker; the episodes are gone
        return [lost_group(task, group_size, f"rollout worker died: {exc}") for task in tasks], True
    return [episodes[i * group_size : (i + 1) * group_size] for i in range(len(tasks))], False


class BusyClock:
    """Seconds during which something (a worker with episodes in flight) was busy."""

    def __init__(self) -> None:
        self.count = 0
        self.since = 0.0
        self.seconds = 0.0

    def start(self) -> None:
        if self.count == 0:
            self.since = time.perf_counter()
        self.count += 1

    def stop(self) -> None:
        self.count -= 1
        if self.count == 0:
            self.seconds += time.perf_counter() - self.since

    def total(self) -> float:
        return self.seconds + (time.perf_counter() - self.since if self.count else 0.0)


def train_async(
    cfg: Config, output_dir: str | Path | None = None, progress: bool | None = None, resume: bool = False
) -> RunResult:
    """RL with rollout and training overlapped: workers keep playing groups while the
    trainer steps (the pool slots a batch frees become groups on the least loaded workers);
    a DataPool actor hands the trainer batches within the staleness bound, one step queued
    behind the running one; weights are published as each step ends and fetched by each
    worker.

    A worker that dies is restarted by Ray; the groups it was playing come back as lost
    episodes (metric `episodes_lost`) and it is re-synced before its next group.

    A checkpoint step is the last one queued until it ends (the trainer's state is then
    exactly that step's); the checkpoint holds the tasks of the groups in flight or in the
    pool, which a resumed run plays first, so no task is lost to a restart."""
    import ray
    from tqdm import tqdm

    from forge.pool import DataPool, group_version
    from forge.reward.shaping import trajectory_advantages

    started = time.perf_counter()
    output = Path(output_dir or cfg.output_dir)
    if resume:
        from forge.train.checkpoint import latest_checkpoint

        latest_checkpoint(output)  # nothing to resume: say so before any actor starts
    start_sandbox(cfg)
    start_ray(env_name=cfg.env.name)
    run = Run(cfg, output)
    step = 0
    weights: tuple[Any, int] | None = None  # latest (ref, version) published
    if resume:
        from forge.train.checkpoint import restore_run

        try:
            step = restore_run(run)
            wrapped, version = ray.get(run.trainer.publish_weights.remote())
            run.sync_weights((wrapped, version))
            weights = (wrapped[0], version)
        except Exception:
            run.shutdown()
            raise
    pool = ray.remote(DataPool).options(num_cpus=0).remote(
        cfg.rollout.tasks_per_step, cfg.async_.max_staleness, cfg.async_.window, cfg.async_.max_buffered_groups
    )
    logger = MetricsLogger(output, cfg.logging.tensorboard, cfg.logging.wandb_project, cfg.to_dict(),
                           trajectories_every=cfg.logging.trajectories_every)
    show_progress = cfg.logging.progress_bar if progress is None else progress
    bar = tqdm(total=cfg.train.max_steps, desc="train async", unit="step", disable=not show_progress,
               initial=step)

    clocks = [BusyClock() for _ in run.workers]
    in_flight: dict[Any, tuple[list[int], int, list[dict[str, Any]]]] = {}  # ref -> (seqs, worker, tasks)
    groups_in_flight = [0] * len(run.workers)
    needs_sync: set[int] = set()
    down: set[int] = set()  # workers Ray is restarting; they get no groups
    probes: dict[Any, int] = {}  # ref of a call to a restarting worker -> its index
    trainer_version = weights[1] if weights else 0
    queued: deque[tuple[Any, list[Trajectory], dict[str, float]]] = deque()  # steps submitted, oldest first
    submitted = step
    train_seconds = 0.0
    lost = 0
    every = cfg.train.checkpoint_every
    task_of: dict[int, dict[str, Any]] = {}  # group seq -> its task, while a checkpoint may need it
    loop_started = step_ended = time.perf_counter()
    failures = FailureWatch(cfg.env.max_error_fraction, cfg.env.error_window_steps)

    def checkpoint_due(n: int) -> bool:
        return bool(every) and (n % every == 0 or n == cfg.train.max_steps)

    def launch(seqs: list[int]) -> None:
        """Start the groups the pool reserved: each live worker gets its share as one
        call, so its episodes run in one batch (per-group calls made batches small, and a
        tiny model's forward costs nearly as much for 8 rows as for 32)."""
        live = [i for i in range(len(run.workers)) if i not in down]
        if not live:
            return
        shares: dict[int, list[int]] = {i: [] for i in live}
        for seq in seqs:
            index = min(live, key=lambda i: groups_in_flight[i] + len(shares[i]))
            shares[index].append(seq)
        for index, share in shares.items():
            if not share:
                continue
            if index in needs_sync and weights is not None:
                run.workers[index].set_weights.remote(weights[0], weights[1])
            needs_sync.discard(index)
            tasks = run.tasks.take(len(share))
            if every:
                task_of.update(zip(share, tasks, strict=True))
            in_flight[run.workers[index].rollout.remote(tasks, cfg.rollout.group_size)] = (share, index, tasks)
            groups_in_flight[index] += len(share)
            clocks[index].start()

    def probe_restarted(ref: Any) -> None:
        """A restarting worker answers once it is back; until then, ask again."""
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        index = probes.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:
            time.sleep(0.2)
            probes[run.workers[index].get_policy_version.remote()] = index
            return
        except ActorDiedError as exc:
            raise RuntimeError(
                f"rollout worker {index} died more than async.max_worker_restarts="
                f"{cfg.async_.max_worker_restarts} times; see its log above ({exc})"
            ) from exc
        down.discard(index)

    def exchange() -> None:
        """One pool round trip: hand over the groups that arrived, take what batches can
        form (each queued on the trainer, which runs its calls in order, so it starts a
        batch the moment the step before ends) and start the groups the pool has room for."""
        nonlocal submitted
        seqs = [seq for batch_seqs, _ in arrived for seq in batch_seqs]
        groups = [group for _, batch_groups in arrived for group in batch_groups]
        arrived.clear()
        max_takes = max(0, min(TRAIN_QUEUE_DEPTH - len(queued), cfg.train.max_steps - submitted))
        if every:  # nothing is queued behind a checkpoint step, so the trainer saves that step's state
            held = checkpoint_due(submitted) and step < submitted
            max_takes = 0 if held else min(max_takes, every - submitted % every)
        live = len(down) < len(run.workers)
        batches, stats, reserved = ray.get(
            pool.exchange.remote(seqs, groups, trainer_version + len(queued), max_takes, len(queued), live)
        )
        for batch in batches:
            at_version = trainer_version + len(queued)  # the version the queued steps leave the trainer at
            trajectories = [t for group in batch for t in group]
            reward_metrics = run.shaper.shape(trajectories)
            advantages = trajectory_advantages(
                trajectories, cfg.train.advantage, cfg.train.advantage_std, cfg.reward.outcome_gap
            )
            staleness = [at_version - (group_version(g) or at_version) for g in batch]
            reward_metrics["staleness_mean"] = sum(staleness) / len(staleness)
            reward_metrics["staleness_max"] = float(max(staleness))
            reward_metrics.update(stats)
            ref = run.trainer.train_and_publish.remote(to_samples(trajectories, advantages))
            queued.append((ref, trajectories, reward_metrics))
            submitted += 1
        launch(reserved)

    # A pool round trip only when it can change something: groups arrived (a batch may
    # form), a step ended (the staleness horizon and the trainer queue moved), or a worker
    # died or came back.
    arrived: list[tuple[list[int], list[list[Trajectory]]]] = []
    changed = True
    try:
        while step < cfg.train.max_steps:
            if changed:
                exchange()
                changed = False
            waiting = list(in_flight) + list(probes) + ([queued[0][0]] if queued else [])
            if not waiting:  # nothing can arrive: say why rather than spin
                raise RuntimeError(
                    f"async training stalled at step {step}: no rollout in flight, no training step "
                    f"queued and the pool cannot form a batch ({ray.get(pool.stats.remote())}, "
                    f"{len(down)} of {len(run.workers)} workers down)"
                )
            ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
            if ready:
                ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
            for ref in ready:
                if queued and ref == queued[0][0]:
                    continue
                if ref in probes:
                    probe_restarted(ref)
                    changed = True
                    continue
                seqs, index, tasks = in_flight.pop(ref)
                changed = True
                clocks[index].stop()
                groups_in_flight[index] -= len(seqs)
                groups, died = collect_groups(ref, tasks, cfg.rollout.group_size)
                if died:  # its groups are dropped, freeing their slots
                    lost += len(seqs) * cfg.rollout.group_size
                    needs_sync.add(index)  # it comes back with the initial weights
                    if index not in down:
                        down.add(index)
                        probes[run.workers[index].get_policy_version.remote()] = index
                arrived.append((seqs, groups))
            if not queued or queued[0][0] not in ready:
                continue

            ref, trajectories, reward_metrics = queued.popleft()
            train_metrics, wrapped, trainer_version = ray.get(ref)
            changed = True
            train_seconds += train_metrics["train_seconds"]
            sync_started = time.perf_counter()
            weights = (wrapped[0], trainer_version)
            for index, worker in enumerate(run.workers):
                if index not in needs_sync:
                    worker.set_weights.remote(weights[0], trainer_version)
            step += 1
            failures.observe(step, trajectories, last_step=step == cfg.train.max_steps)
            wall = time.perf_counter() - loop_started
            metrics = rollout_metrics(trajectories)
            metrics.update(reward_metrics)
            metrics.update(train_metrics)
            metrics.update(
                episodes_lost=float(lost),
                sync_seconds=time.perf_counter() - sync_started,
                policy_version=float(trainer_version),
                trainer_idle_fraction=max(0.0, 1.0 - train_seconds / wall),
                rollout_idle_fraction=max(0.0, 1.0 - sum(c.total() for c in clocks) / (wall * len(clocks))),
                step_seconds=time.perf_counter() - step_ended,
                wall_seconds=time.perf_counter() - started,
            )
            step_ended = time.perf_counter()
            lost = 0
            metrics["sandbox_level"] = float(cfg.sandbox.level)
            logger.record_step(step, metrics, trajectories, run.tokenizer, cfg.logging.trajectory_samples)
            show_step(bar, metrics, stale=f"{metrics['staleness_mean']:.2f}")
            if checkpoint_due(step):
                from forge.train.checkpoint import save_run

                # Groups still in flight or in the pool: their tasks are not trained on yet.
                pending = ray.get(pool.pending.remote())
                task_of = {seq: task_of[seq] for seq in pending if seq in task_of}
                save_run(run, step, cfg.train.keep_checkpoints, pending_tasks=list(task_of.values()))
        checkpoint = Path(ray.get(run.trainer.save.remote(str(output / "final"))))
    finally:
        bar.close()
        logger.close()
        for ref in in_flight:
            ray.cancel(ref)
        ray.kill(pool)
        run.shutdown()
    summary = {"steps": step, "checkpoint": str(checkpoint), "wall_seconds": time.perf_counter() - started}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(output, step, checkpoint, summary["wall_seconds"])
