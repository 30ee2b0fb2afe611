"""Asynchronous RL: workers keep playing groups while the trainer steps; a DataPool actor
hands the trainer batches within the staleness bound (`async.*`)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from forge.config import Config
from forge.failures import RunStopped, env_watches
from forge.run.context import (
    Run,
    RunResult,
    StepLog,
    checkpoint_due,
    finish,
    open_run,
    shape_rewards,
    step_metrics,
    to_samples,
)
from forge.run.faults import (
    death_cause,
    lost_group,
    stop_if_engines_lost,
    stop_if_model_missing,
    worker_gone_message,
)
from forge.run.frozen import keep_snapshot
from forge.run.held_out import evaluation_due, held_out_metrics, held_out_tasks
from forge.run.rounds import has_signal
from forge.types import Trajectory

# Async mode keeps this many training steps submitted to the trainer: one running, one
# queued behind it, so the trainer never waits on the driver between steps.
TRAIN_QUEUE_DEPTH = 2


def train_async(
    cfg: Config, output_dir: str | Path | None = None, progress: bool | None = None, resume: bool = False
) -> RunResult:
    """RL with rollout and training overlapped: workers keep playing groups while the
    trainer steps (the pool slots a batch frees become groups on the least loaded workers);
    a DataPool actor hands the trainer batches within the staleness bound, one step queued
    behind the running one; weights are published as each step ends and fetched by each
    worker.

    A worker that dies is restarted by Ray; the groups it was playing come back as lost
    episodes (metric `episodes_lost`, which also counts episodes lost with their engine
    server) and it is re-synced before its next group.

    A checkpoint step is the last one queued until it ends (the trainer's state is then
    exactly that step's); the checkpoint holds the tasks of the groups in flight or in the
    pool, which a resumed run plays first, so no task is lost to a restart."""
    import ray

    started = time.perf_counter()
    output = Path(output_dir or cfg.output_dir)
    held_out = held_out_tasks(cfg)
    run, done, published = open_run(cfg, output, resume)
    weights = (published[0][0], published[1]) if published else None  # (the weights' ref, their version)
    log = StepLog(cfg, output, progress, "train async", done)
    loop = AsyncLoop(run, done, weights)
    try:
        while loop.step < cfg.train.max_steps:
            if not loop.wait_for_step():
                continue
            trajectories, metrics = loop.end_step(started)
            if held_out and evaluation_due(loop.step, cfg.eval.every_steps, cfg.train.max_steps):
                metrics.update(loop.evaluate(held_out))
            # Also the step that stops the run: trained, since its training ended before it.
            stale = f"{metrics['staleness_mean']:.2f}"
            record = partial(log.record, loop.step, metrics, trajectories, run.tokenizer, stale=stale)
            last = loop.step == cfg.train.max_steps
            loop.failures.observe(loop.step, trajectories, last_step=last, before_stop=record)
            record()
            if loop.checkpoint_due(loop.step):
                loop.save_checkpoint()
            loop.signal.observe(loop.step, metrics, last_step=last)
        checkpoint = Path(ray.get(run.trainer.save.remote(str(output / "final"))))
    finally:
        try:
            log.close()  # a full disk fails it again: the actors are shut down still
        finally:
            loop.stop()
            run.shutdown()
    return finish(output, loop.step, checkpoint, started)


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


@dataclass
class RolloutCall:
    """One streaming rollout call on a worker: its groups' pool numbers and tasks, by
    position, and the positions it has sent so far."""

    seqs: list[int]
    worker: int
    tasks: list[dict[str, Any]]
    sent: set[int] = field(default_factory=set)


class AsyncLoop:
    """An async run between its steps: the pool, the worker calls in flight, the workers
    down or out of sync, and the training steps queued on the trainer.

    A pool round trip happens only when it can change something: groups arrived (a batch
    may form), a step ended (the staleness horizon and the trainer queue moved), or a
    worker died or came back."""

    def __init__(self, run: Run, step: int, weights: tuple[Any, int] | None) -> None:
        import ray

        from forge.pool import DataPool

        cfg = run.cfg
        self.run = run
        self.cfg = cfg
        pool_actor = ray.remote(DataPool).options(num_cpus=0)
        self.pool = pool_actor.remote(
            cfg.rollout.tasks_per_step,
            cfg.async_.max_staleness,
            cfg.async_.window,
            cfg.async_.max_buffered_groups,
        )
        self.step = step
        self.submitted = step  # steps handed to the trainer
        self.weights = weights  # latest (ref, version) published
        self.trainer_version = weights[1] if weights else 0
        self.clocks = [BusyClock() for _ in run.workers]
        self.in_flight: dict[Any, RolloutCall] = {}  # a worker call's streaming generator -> the call
        self.groups_in_flight = [0] * len(run.workers)
        # Restarted workers: they get the latest weights with their next call.
        self.needs_sync: set[int] = set()
        self.down: set[int] = set()  # workers Ray is restarting; they get no groups
        self.probes: dict[Any, int] = {}  # ref of a call to a restarting worker -> its index
        # training steps submitted, oldest first: (its call, its episodes, its reward metrics)
        self.queued: deque[tuple[Any, list[Trajectory], dict[str, float]]] = deque()
        # (group seqs, groups) that arrived since the last pool round trip
        self.arrived: list[tuple[list[int], list[list[Trajectory]]]] = []
        self.changed = True  # whether a pool round trip may change something
        self.task_of: dict[int, dict[str, Any]] = {}  # group seq -> its task, while a checkpoint may need it
        self.train_seconds = 0.0
        self.lost = 0  # episodes lost since the last step
        self.loading: dict[int, Any] = {}  # worker -> its call loading the weights the last step published
        # Dead workers' episodes lost so far, said once the last of their calls in flight has ended.
        self.lost_by_death: dict[int, int] = {}
        # Dynamic sampling (rollout.max_rounds_per_step, forge.run.rounds): finished groups
        # without signal left out since the last batch submitted, and their seqs the pool frees.
        self.leave_out_at_most = (cfg.rollout.max_rounds_per_step - 1) * cfg.rollout.tasks_per_step
        self.left_out: list[list[Trajectory]] = []
        self.discarded: list[int] = []
        self.failures, self.signal = env_watches(cfg, from_scratch=step == 0)
        self.loop_started = self.step_ended = time.perf_counter()

    def checkpoint_due(self, step: int) -> bool:
        return checkpoint_due(step, self.cfg.train.checkpoint_every, self.cfg.train.max_steps)

    def wait_for_step(self) -> bool:
        """Exchange with the pool if something changed, wait up to a second for a worker
        call, a probe or the oldest queued step to end, and take in the worker calls and
        probes that did; True when the oldest queued step has ended."""
        import ray

        if self.changed:
            self.exchange()
            self.changed = False
        oldest = [self.queued[0][0]] if self.queued else []
        waiting = list(self.in_flight) + list(self.probes) + oldest
        if not waiting:  # nothing can arrive: say why rather than spin
            raise RuntimeError(
                f"async training stalled at step {self.step}: no rollout in flight, no training step "
                f"queued and the pool cannot form a batch ({ray.get(self.pool.stats.remote())}, "
                f"{len(self.down)} of {len(self.run.workers)} workers down)"
            )
        ready, _ = ray.wait(waiting, num_returns=1, timeout=1.0)
        if ready:
            ready, _ = ray.wait(waiting, num_returns=len(waiting), timeout=0)
        for ref in ready:
            if oldest and ref == oldest[0]:
                continue
            self.changed = True
            if ref in self.probes:
                self.probe_restarted(ref)
            else:
                self.take_rollout(ref)
        return bool(oldest) and oldest[0] in ready

    def exchange(self) -> None:
        """One pool round trip: hand over the groups that arrived, take what batches can
        form (each queued on the trainer, which runs its calls in order, so it starts a
        batch the moment the step before ends) and start the groups the pool has room for."""
        import ray

        seqs = [seq for batch_seqs, _ in self.arrived for seq in batch_seqs]
        groups = [group for _, batch_groups in self.arrived for group in batch_groups]
        self.arrived.clear()
        max_takes = max(
            0, min(TRAIN_QUEUE_DEPTH - len(self.queued), self.cfg.train.max_steps - self.submitted)
        )
        every = self.cfg.train.checkpoint_every
        if every:  # nothing is queued behind a checkpoint step, so the trainer saves that step's state
            held = self.checkpoint_due(self.submitted) and self.step < self.submitted
            max_takes = 0 if held else min(max_takes, every - self.submitted % every)
        live = len(self.down) < len(self.run.workers)
        discarded, self.discarded = self.discarded, []
        batches, stats, reserved = ray.get(
            self.pool.exchange.remote(
                seqs,
                groups,
                self.trainer_version + len(self.queued),
                max_takes,
                len(self.queued),
                live,
                discarded,
            )
        )
        for batch in batches:
            self.submit(batch, stats)
        self.launch(reserved)

    def submit(self, batch: list[list[Trajectory]], pool_stats: dict[str, float]) -> None:
        """Queue a training step on `batch`, with its reward and staleness metrics."""
        from forge.pool import staleness_metrics

        # The version the steps queued before it leave the trainer at.
        at_version = self.trainer_version + len(self.queued)
        trained = [t for group in batch for t in group]
        # The groups left out for no signal since the last batch are shaped and counted with it.
        left_out, self.left_out = self.left_out, []
        trajectories = [t for group in left_out for t in group] + trained
        reward_metrics, advantages = shape_rewards(
            self.run.shaper, trajectories, self.cfg, self.submitted + 1
        )
        samples = to_samples(trained, advantages[len(trajectories) - len(trained) :], self.cfg)
        reward_metrics.update(staleness_metrics(batch, at_version, samples))
        reward_metrics.update(pool_stats)
        if self.leave_out_at_most:
            reward_metrics["sampling/groups_left_out"] = float(len(left_out))
        ref = self.run.trainer.train_and_publish.remote(samples)
        self.queued.append((ref, trajectories, reward_metrics))
        self.submitted += 1

    def launch(self, seqs: list[int]) -> None:
        """Start the groups the pool reserved: each live worker gets its share as one
        call, so its episodes run in one batch (per-group calls made batches small, and a
        tiny model's forward costs nearly as much for 8 rows as for 32)."""
        live = [i for i in range(len(self.run.workers)) if i not in self.down]
        if not live:
            return
        shares: dict[int, list[int]] = {i: [] for i in live}
        for seq in seqs:
            index = min(live, key=lambda i: self.groups_in_flight[i] + len(shares[i]))
            shares[index].append(seq)
        for index, share in shares.items():
            if share:
                self.start_groups(index, share)

    def start_groups(self, index: int, seqs: list[int]) -> None:
        """One rollout call on worker `index` for the groups `seqs`; a worker Ray restarted
        gets the latest weights first, or with engine servers the driver's view of them (its
        router would start at version 0 with every engine the run started with live)."""
        worker = self.run.workers[index]
        if index in self.needs_sync and self.run.engine_view is not None:
            worker.set_engine_view.remote(self.run.engine_view)
        elif index in self.needs_sync and self.weights is not None:
            worker.set_weights.remote(self.weights[0], self.weights[1])
        self.needs_sync.discard(index)
        tasks = self.run.tasks.take(len(seqs))
        if self.cfg.train.checkpoint_every:
            self.task_of.update(zip(seqs, tasks, strict=True))
        # Streamed: the call yields each group as it ends, so a short group reaches the pool
        # without waiting for the call's slowest episode.
        stream = worker.rollout_groups.remote(tasks, self.cfg.rollout.group_size)
        self.in_flight[stream] = RolloutCall(seqs, index, tasks)
        self.groups_in_flight[index] += len(seqs)
        self.clocks[index].start()

    def take_rollout(self, stream: Any) -> None:
        """A worker call has groups ready, or has ended: its finished groups arrive for the
        pool; if the worker died, the groups it had not sent are lost stand-ins, and the
        worker is probed until Ray has restarted it."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

        call = self.in_flight[stream]
        while True:
            try:
                position, group = ray.get(next(stream))
            except StopIteration:
                self.end_call(stream)
                return
            except RayTaskError as exc:
                stop_if_engines_lost(exc)
                raise
            except (RayActorError, ActorUnavailableError) as exc:
                stop_if_model_missing(exc)
                # Ray restarts the worker; the episodes are gone.
                self.worker_died(stream, death_cause(exc))
                return
            call.sent.add(position)
            self.groups_in_flight[call.worker] -= 1
            # Episodes whose engine was lost: the pool leaves them out, the step counts them.
            self.lost += sum(t.status == "lost" for t in group)
            if self.leaves_out(group):
                self.left_out.append(group)
                self.discarded.append(call.seqs[position])
            else:
                self.arrived.append(([call.seqs[position]], [group]))
            if not ray.wait([stream], timeout=0)[0]:  # nothing more yet
                return

    def leaves_out(self, group: list[Trajectory]) -> bool:
        """Whether a finished group is left out for having no learning signal: only with
        dynamic sampling on, within its budget per batch, and not for a group all lost (the
        pool drops that one as before)."""
        if len(self.left_out) >= self.leave_out_at_most or all(t.status == "lost" for t in group):
            return False
        return not has_signal(self.run.shaper, group, self.cfg, self.submitted + 1)

    def end_call(self, stream: Any) -> None:
        call = self.in_flight.pop(stream)
        self.clocks[call.worker].stop()
        index = call.worker
        if index in self.lost_by_death and all(c.worker != index for c in self.in_flight.values()):
            # Each call in flight on a dead worker raises on its own: one line per death, with the total.
            self.run.tell_worker_death(index, self.lost_by_death.pop(index))

    def worker_died(self, stream: Any, error: str) -> None:
        call = self.in_flight[stream]
        unsent = [position for position in range(len(call.seqs)) if position not in call.sent]
        self.groups_in_flight[call.worker] -= len(unsent)
        size = self.cfg.rollout.group_size
        self.lost += len(unsent) * size  # their slots are freed, their groups dropped
        self.lost_by_death[call.worker] = self.lost_by_death.get(call.worker, 0) + len(unsent) * size
        self.end_call(stream)
        self.arrived.append(
            ([call.seqs[p] for p in unsent], [lost_group(call.tasks[p], size, error) for p in unsent])
        )
        index = call.worker
        self.needs_sync.add(index)  # it comes back with the initial weights
        if index not in self.down:
            self.down.add(index)
            self.probes[self.run.workers[index].get_policy_version.remote()] = index

    def probe_restarted(self, ref: Any) -> None:
        """A restarting worker answers once it is back; until then, ask again."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError

        index = self.probes.pop(ref)
        try:
            ray.get(ref)
        except ActorUnavailableError:
            time.sleep(0.2)
            self.probes[self.run.workers[index].get_policy_version.remote()] = index
            return
        except ActorDiedError as exc:
            raise RunStopped(worker_gone_message(index, self.cfg.async_.max_worker_restarts, exc)) from None
        self.down.discard(index)
        self.run.recheck_sandbox_level(index)

    def evaluate(self, tasks: list[dict[str, Any]]) -> dict[str, float]:
        """The held-out `tasks` played by the policy just published, on the workers that hold
        it (not down, not waiting for their sync), beside their training groups in flight. The
        driver waits for them: no weights reach the workers meanwhile, so one version samples
        every eval token (eval/policy_version_spread 0); the trainer goes on with the steps queued.

        A worker plays them once its load of those weights has ended: Ray starts an async
        actor's call whose arguments are ready (the held-out tasks) before an earlier one still
        fetching its own (the weights), so without the wait its first eval tokens were the
        previous version's. A worker whose load fails (it died) plays none."""
        import ray
        from ray.exceptions import ActorUnavailableError, RayActorError

        ready = []
        for index in range(len(self.run.workers)):
            if index in self.down or index in self.needs_sync:
                continue
            try:
                if index in self.loading:
                    ray.get(self.loading[index])
            except (RayActorError, ActorUnavailableError):
                continue  # its rollout call fails too: the loop counts that death
            ready.append(index)
        return held_out_metrics(self.run, tasks, self.cfg.eval.episodes, ready)

    def end_step(self, started: float) -> tuple[list[Trajectory], dict[str, float]]:
        """The oldest queued step has ended: send its weights to every worker in sync, count
        the step, and return its episodes and metrics."""
        import ray

        ref, trajectories, reward_metrics = self.queued.popleft()
        train_metrics, wrapped, self.trainer_version = ray.get(ref)
        self.changed = True
        self.train_seconds += train_metrics["train_seconds"]
        sync_started = time.perf_counter()
        self.weights = (wrapped[0], self.trainer_version)
        if self.run.engines is not None:
            # Engine servers: each pauses between batches, loads, resumes; episodes in
            # flight go on, their later tokens stamped with the new version.
            self.run.sync_weights((wrapped, self.trainer_version))
        synced = [i for i in range(len(self.run.workers)) if i not in self.needs_sync]
        if self.run.engines is None:
            loading = [
                self.run.workers[i].set_weights.remote(self.weights[0], self.trainer_version) for i in synced
            ]
            self.loading = dict(zip(synced, loading, strict=True))
            if synced:
                keep_snapshot(self.run.frozen_snapshot, self.cfg.swarm.frozen_version, self.trainer_version,
                              self.run.workers[synced[0]], loading[0])  # fmt: skip
        self.step += 1
        wall = time.perf_counter() - self.loop_started
        busy = sum(clock.total() for clock in self.clocks)
        loop_metrics = {
            "episodes_lost": float(self.lost),
            "sync_seconds": time.perf_counter() - sync_started,
            "policy_version": float(self.trainer_version),
            "trainer_idle_fraction": max(0.0, 1.0 - self.train_seconds / wall),
            "rollout_idle_fraction": max(0.0, 1.0 - busy / (wall * len(self.clocks))),
            "step_seconds": time.perf_counter() - self.step_ended,
            "wall_seconds": time.perf_counter() - started,
            **(self.run.engines.engine_metrics() if self.run.engines is not None else {}),
        }
        self.step_ended = time.perf_counter()
        self.lost = 0
        return trajectories, step_metrics(
            trajectories, reward_metrics, train_metrics, loop_metrics, swarm=self.cfg.swarm.enabled
        )

    def save_checkpoint(self) -> None:
        """Checkpoint after this step, with the tasks of the groups still in flight or in the
        pool (not trained on yet), which a resumed run plays first."""
        import ray

        from forge.train.checkpoint import save_run

        pending = ray.get(self.pool.pending.remote())
        self.task_of = {seq: self.task_of[seq] for seq in pending if seq in self.task_of}
        save_run(
            self.run, self.step, self.cfg.train.keep_checkpoints, pending_tasks=list(self.task_of.values())
        )

    def stop(self) -> None:
        import ray

        for ref in self.in_flight:
            ray.cancel(ref)
        ray.kill(self.pool)
