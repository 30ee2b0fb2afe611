"""RolloutWorker: plays episodes with the current policy. Run as a Ray actor."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import torch

from forge.config import EnvConfig, ModelConfig, RolloutConfig, SandboxConfig, SwarmConfig
from forge.env.calls import build_env
from forge.env.closing import close_envs, close_in_background
from forge.env.errors import describe_env_error
from forge.env.latency import with_latency
from forge.env.registry import resolve_env
from forge.rollout.agent import EpisodeLimits, run_episode
from forge.rollout.chat import ChatFormat
from forge.rollout.engines.batching import BatchingEngine
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.router import EngineView, Router
from forge.rollout.stuck import LoopGuard, stuck_limit_s
from forge.sandbox.policy import SandboxReport
from forge.types import Trajectory
from forge.weights import PackedWeights, unpack_weights


class RolloutWorker:
    def __init__(
        self,
        model_path: str,
        model_cfg: ModelConfig,
        env_cfg: EnvConfig,
        rollout_cfg: RolloutConfig,
        success_threshold: float,
        seed: int,
        num_threads: int | None = None,
        sandbox_cfg: SandboxConfig | None = None,
        engine_urls: list[str] | None = None,
        worker_index: int = 0,
        swarm_cfg: SwarmConfig | None = None,
        frozen_snapshot: str | None = None,
        stuck_report_dir: str | None = None,
        env_output_log: str | None = None,
    ) -> None:
        """With `stuck_report_dir` (a run's workers, which Ray restarts), a loop stuck past
        `stuck_limit_s` ends this process, its stacks written there (`forge.rollout.stuck`).
        With `env_output_log` (a run's workers, logging.env_output: file), this process's
        output goes to that file from here on, env module imports included (`forge.env.output`)."""
        if env_output_log:
            from forge.env.output import send_env_output_to

            send_env_output_to(Path(env_output_log))
        from forge.actor_errors import quiet_known_creation_errors

        quiet_known_creation_errors()  # the driver says a refusal here in one line (forge.run.worker_levels)
        from forge.models.loading import (
            generation_end_ids,
            load_model,
            load_tokenizer,
            node_checkpoint_folder,
            node_name,
            resolve_device,
        )
        from forge.sandbox.core import SandboxUnavailable
        from forge.sandbox.policy import WorkerSandboxRefused, configure_for_env, report

        # Each actor is its own process, maybe on a node that offers less than the driver's:
        # apply the run's sandbox policy here too, and keep the level for the driver to record.
        try:
            configure_for_env(sandbox_cfg or SandboxConfig(), resolve_env(env_cfg.name), env_cfg.name)
        except SandboxUnavailable as exc:
            raise WorkerSandboxRefused(
                f"rollout worker {worker_index} on node {node_name()}: {exc}"
            ) from None
        self.sandbox = report(node_name())
        torch.set_num_threads(num_threads or rollout_cfg.threads)
        torch.manual_seed(seed)
        # A hub id resolves in this node's cache; a failure names this actor and its node.
        model_path = node_checkpoint_folder(model_path, model_cfg.revision, f"rollout worker {worker_index}")
        self.tokenizer = load_tokenizer(model_path)
        self.chat = ChatFormat(self.tokenizer, generation_end_ids(model_path))
        self.router: Router | None = None
        self.engine: HFEngine | None = None
        if engine_urls:  # generation runs on engine servers; this worker holds no model
            from forge.rollout.engines.clients import client_factory, run_sampling

            sampling = run_sampling(rollout_cfg, self.chat.stop_token_ids)
            self._client = client_factory(model_cfg, rollout_cfg, sampling)
            clients = [self._client(url) for url in engine_urls]
            self.router = Router(
                clients,
                offset=worker_index,
                name=f"rollout worker {worker_index}",
                lost_wait_s=rollout_cfg.engine_timeout_s,
            )
        else:
            device = resolve_device(model_cfg.device, rollout_cfg.num_gpus_per_worker)
            self.model = load_model(
                model_path,
                model_cfg,
                trainable=False,
                device=device,
                attn_implementation=rollout_cfg.attn_implementation,
                setting_key="rollout.attn_implementation",
            )
            self.engine = HFEngine(
                self.model,
                stop_token_ids=self.chat.stop_token_ids,
                pad_token_id=self.tokenizer.pad_token_id,
                temperature=rollout_cfg.temperature,
                top_p=rollout_cfg.top_p,
                seed=seed,
                max_context_tokens=rollout_cfg.max_context_tokens,
                prefill_chunk_tokens=rollout_cfg.prefill_chunk_tokens,
            )
        self.env_class = resolve_env(env_cfg.name)
        self.env_kwargs = dict(env_cfg.kwargs)
        self.env_latency = env_cfg.latency
        self.step_timeout_s = env_cfg.step_timeout_s
        self.limits = EpisodeLimits(
            max_turns=rollout_cfg.max_turns,
            max_new_tokens=rollout_cfg.max_new_tokens,
            max_context_tokens=rollout_cfg.max_context_tokens,
            step_timeout_s=env_cfg.step_timeout_s,
            episode_timeout_s=env_cfg.episode_timeout_s,
            success_threshold=success_threshold,
        )
        self.rng = random.Random(seed)
        self.seed = seed
        self.guard = (
            LoopGuard(
                stuck_report_dir,
                f"rollout_{worker_index}",
                stuck_limit_s(env_cfg.step_timeout_s, env_cfg.stuck_grace_s),
            )
            if stuck_report_dir
            else None
        )
        self.rollouts_playing = 0  # rollout calls in progress: the guard is armed while one is
        self.swarm = swarm_cfg if swarm_cfg is not None and swarm_cfg.enabled else None
        self.frozen: HFEngine | None = None  # the sub-agents' weight snapshot (swarm.subagent_policy: frozen)
        # Where the run keeps that snapshot (forge.run.frozen), so that a worker Ray restarted
        # or a resumed run samples sub-agents from the version the run froze, not a later one.
        self.frozen_snapshot = Path(frozen_snapshot) if frozen_snapshot else None
        self._frozen_sampling: Any = None  # a checkpoint's sampling state, until the snapshot is loaded
        if self.swarm is not None:
            from forge.rollout.spawn import swarm_env_problem

            problem = swarm_env_problem(self.env_class, env_cfg.name)
            if problem:
                raise ValueError(problem)
            if self.swarm.subagent_policy == "frozen" and self.swarm.frozen_version == 0:
                self._freeze()

    def sandbox_report(self) -> SandboxReport:
        """The sandbox level this worker's env code runs at, and its node."""
        return self.sandbox

    def _freeze(self, weights: dict[str, torch.Tensor] | None = None, version: int | None = None) -> None:
        """Keep a copy of the engine's weights for sub-agents (a second model): its current
        weights, or `weights` of `version` (a snapshot the run saved)."""
        import copy

        if self.engine is None:
            raise ValueError("swarm.subagent_policy: frozen needs rollout.engine: inprocess")
        model = copy.deepcopy(self.engine.model)
        if weights is not None:
            model.load_state_dict(weights)
        self.frozen = HFEngine(
            model,
            stop_token_ids=self.chat.stop_token_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            temperature=self.engine.temperature,
            top_p=self.engine.top_p,
            seed=self.seed + 1,  # its own sampling stream, apart from the policy's
            max_context_tokens=self.engine.max_context_tokens,
            prefill_chunk_tokens=self.engine.prefill_chunk_tokens or 0,  # the policy engine's, resolved
        )
        self.frozen.policy_version = self.engine.policy_version if version is None else version
        if self._frozen_sampling is not None:
            self.frozen.generator.set_state(self._frozen_sampling)
            self._frozen_sampling = None

    def _keep_frozen(self, version: int) -> None:
        """After a weight sync to `version`: take the sub-agents' snapshot when the run reaches
        `swarm.frozen_version`; past it, load the one the run saved."""
        swarm = self.swarm
        if swarm is None or swarm.subagent_policy != "frozen" or self.frozen is not None:
            return
        if version < swarm.frozen_version:
            return  # until then sub-agents use the current policy
        snapshot = self.frozen_snapshot
        if snapshot is not None and snapshot.exists():
            self._freeze(torch.load(snapshot, weights_only=True), swarm.frozen_version)
        elif version == swarm.frozen_version:
            self._freeze()
        else:
            raise RuntimeError(
                f"swarm.frozen_version is {swarm.frozen_version} but this worker first got version {version} "
                f"and the run saved no snapshot of version {swarm.frozen_version}"
                + (f" at {snapshot}" if snapshot is not None else "")
                + "; sub-agents would sample from the wrong weights. Start the run afresh, or set "
                "swarm.frozen_version to a version not yet reached"
            )

    def save_frozen(self, path: str) -> str:
        """Write the sub-agents' snapshot to `path` (atomically: a reader never sees half a file)."""
        if self.frozen is None:
            raise RuntimeError(
                "no frozen sub-agent policy to save: this worker has not reached swarm.frozen_version"
            )
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
        with self._unguarded():  # runs on the event loop, as long as the model is big
            torch.save(self.frozen.model.state_dict(), partial)
        os.replace(partial, target)
        return str(target)

    def set_engine_view(self, view: EngineView) -> None:
        """The driver's view of the engines (`EngineView`): set between steps, and before a
        restarted worker's first rollout."""
        self.router.take_view(view, self._client)

    def get_policy_version(self) -> int:
        return self.engine.policy_version if self.engine is not None else self.router.policy_version

    def rng_state(self) -> dict[str, Any]:
        """Episode seeds and token sampling state, for a checkpoint to resume exactly
        (with engine servers, sampling state lives in them and is not saved)."""
        sampling = self.engine.generator.get_state() if self.engine is not None else None
        frozen = self.frozen.generator.get_state() if self.frozen is not None else self._frozen_sampling
        return {"episodes": self.rng.getstate(), "sampling": sampling, "frozen_sampling": frozen}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        self.rng.setstate(state["episodes"])
        if self.engine is not None and state.get("sampling") is not None:
            self.engine.generator.set_state(state["sampling"])
        frozen = state.get("frozen_sampling")
        if frozen is not None:  # the sub-agents' stream; its snapshot may be loaded later (forge.run.frozen)
            if self.frozen is not None:
                self.frozen.generator.set_state(frozen)
            else:
                self._frozen_sampling = frozen

    def next_token_logprobs(self, token_ids: list[int]) -> list[float]:
        """The policy's next-token distribution after `token_ids` (to check a weight sync)."""
        return self.engine.next_token_logprobs(token_ids).tolist()

    def set_weights(self, weights: PackedWeights | dict[str, torch.Tensor], version: int) -> int:
        with self._unguarded():  # runs on the event loop, as long as the model is big
            self.engine.load_weights(unpack_weights(weights), version)
            self._keep_frozen(version)
        return version

    def _unguarded(self) -> contextlib.AbstractContextManager[None]:
        return self.guard.paused_for() if self.guard is not None else contextlib.nullcontext()

    async def close(self) -> None:
        """Stop the batcher's runner task (called before the actor is killed, so that a
        runner kept alive by overlapping rollout calls does not die pending) and the guard."""
        for name in ("batching", "frozen_batching"):
            batching = getattr(self, name, None)
            if batching is not None:
                await batching.close()
        if self.guard is not None:
            self.guard.stop()

    async def rollout(self, tasks: list[dict[str, Any]], group_size: int) -> list[Trajectory]:
        """Play `group_size` episodes of each task; episodes of all tasks share batches.
        Returns them task by task, when all have ended.

        Async, so under Ray this is an async actor: a weight sync can arrive while episodes
        run, and each token records the version that actually produced it."""
        groups = {index: group async for index, group in self.rollout_groups(tasks, group_size)}
        return [t for index in sorted(groups) for t in groups[index]]

    async def rollout_groups(
        self, tasks: list[dict[str, Any]], group_size: int
    ) -> AsyncIterator[tuple[int, list[Trajectory]]]:
        """`rollout`, streamed: yields (index of the task, its group's episodes) as each
        group ends, so a caller (Ray's streaming generator) gets short groups without waiting
        for the call's slowest episode."""
        # One batcher for all concurrent calls, so groups launched separately (async mode)
        # still share generation batches.
        if self.router is not None:
            await self.router.readmit()  # between rollouts: dropped engines that hold the weights again
            engine: BatchingEngine | Router = self.router
        else:
            if getattr(self, "batching", None) is None or self.batching.engine is not self.engine:
                self.batching = BatchingEngine(self.engine)
            engine = self.batching
        playing: list[asyncio.Future] = []
        # Loading a frozen snapshot is long work, not an env call: no limit. Envs are built
        # in the groups' coroutines, under env.step_timeout_s and the armed guard.
        with self._unguarded():
            subagent_engine = self._subagent_engine(engine)
        if self.guard is not None:
            # Generation batches run on this loop: one longer than the guard's limit (long
            # replies, a big model) beats at each decode step instead of reading as stuck.
            for local in (self.engine, self.frozen):
                if local is not None:
                    local.heartbeat = self.guard.beat
        for index, task in enumerate(tasks):
            group = self._play_group(index, task, group_size, engine, subagent_engine)
            playing.append(asyncio.ensure_future(group))
        if self.guard is not None:
            self.guard.start()
        self.rollouts_playing += 1
        try:
            for finished in asyncio.as_completed(playing):
                yield await finished
        finally:
            self.rollouts_playing -= 1
            for future in playing:  # the caller stopped early (cancelled): end what still plays
                future.cancel()
            for used in {id(engine): engine, id(subagent_engine): subagent_engine}.values():
                if used.active_episodes == 0:
                    await used.close()
            if self.guard is not None and self.rollouts_playing == 0:
                # Disarmed between rollouts: a caller whose loop ends with the call (asyncio.run:
                # forge eval, a script) must not be ended by it later, when nothing is guarded.
                self.guard.stop()

    def _play_group(
        self, index: int, task: dict[str, Any], group_size: int, engine: Any, subagent_engine: Any
    ) -> Any:
        """The coroutine that builds one task's envs and plays its group (its group id and
        episode seeds drawn now, in task order, so a rerun draws the same)."""
        group_id = f"{task.get('task_id', '')}@v{self.get_policy_version()}#{self.rng.getrandbits(32):08x}"
        seeds = [self.rng.getrandbits(31) for _ in range(group_size)]
        return self._build_and_play(index, task, group_id, seeds, engine, subagent_engine)

    async def _build_and_play(
        self,
        index: int,
        task: dict[str, Any],
        group_id: str,
        seeds: list[int],
        engine: Any,
        subagent_engine: Any,
    ) -> tuple[int, list[Trajectory]]:
        """Build the group's envs one by one, each within env.step_timeout_s (`build_env`),
        then play them. A constructor that raises or runs over fails the whole group: its
        episodes are recorded as errors (no token was generated) and the rest are not built,
        so a constructor that always hangs costs one time limit per group, not one per env."""
        started = time.monotonic()
        envs: list[Any] = []
        try:
            for _ in seeds:
                envs.append(await build_env(self.env_class, self.env_kwargs, timeout_s=self.step_timeout_s))
        except Exception as exc:
            await close_envs(envs, self.step_timeout_s)
            error = describe_env_error(exc, self.env_class)
            return index, [unbuilt_episode(task, group_id, error, time.monotonic() - started) for _ in seeds]
        except BaseException:  # cancelled while building: the caller stopped early
            close_in_background(envs, self.step_timeout_s)
            raise
        jobs = []
        for env, seed in zip(envs, seeds, strict=True):
            spawner = None
            # A spawner is attached to the env itself, before a latency wrapper copies its tools.
            if self.swarm is not None:
                spawner = self._spawner(env, subagent_engine, engine, task, group_id, seed)
            wrapped = with_latency(env, self.env_latency, self.step_timeout_s)
            jobs.append(run_episode(wrapped, task, seed, engine, self.chat, self.limits, group_id, spawner))
        return await play_group(index, envs, jobs, self.step_timeout_s)

    def _subagent_engine(self, engine: BatchingEngine | Router) -> BatchingEngine | Router:
        """What sub-agents sample from: the frozen snapshot's batcher, else the policy's."""
        if self.engine is not None:  # a sync that raised unseen (async mode sends weights without waiting)
            self._keep_frozen(self.engine.policy_version)
        if self.frozen is None:
            return engine
        if getattr(self, "frozen_batching", None) is None or self.frozen_batching.engine is not self.frozen:
            self.frozen_batching = BatchingEngine(self.frozen)
        return self.frozen_batching

    def _spawner(
        self, env: Any, engine: Any, parent_engine: Any, task: dict[str, Any], group_id: str, seed: int
    ) -> Any:
        from forge.rollout.spawn import Spawner, SwarmLimits

        swarm = self.swarm
        limits = SwarmLimits(swarm.max_subagents_per_call, swarm.max_subagents_per_episode, swarm.depth,
                             swarm.timeout_s, swarm.subagent_max_turns)  # fmt: skip
        spawner = Spawner(env, engine, parent_engine, self.chat, self.limits, limits,
                          str(task.get("task_id", "")), group_id, seed)  # fmt: skip
        spawner.attach()
        return spawner


async def play_group(
    index: int, envs: list[Any], jobs: list[Any], timeout_s: float
) -> tuple[int, list[Trajectory]]:
    """One group's episodes, played together; its envs are closed as soon as it ends, each
    within `timeout_s` (a close that raises or hangs is noted on its episode as
    `info["close_error"]` and printed once per kind; the episode stands)."""
    try:
        trajectories = list(await asyncio.gather(*jobs))
    except BaseException:  # cancelled: the caller stopped early and waits for nothing
        close_in_background(envs, timeout_s)
        raise
    for trajectory, error in zip(trajectories, await close_envs(envs, timeout_s), strict=True):
        if error is not None:
            trajectory.info["close_error"] = error
    return index, trajectories


def unbuilt_episode(task: dict[str, Any], group_id: str, error: str, seconds: float) -> Trajectory:
    """The episode of an env that could not be built: an error with no tokens, counted
    against env.max_error_fraction like any episode error (a run trains on nothing from it)."""
    return Trajectory(
        task_id=str(task.get("task_id", "")),
        group_id=group_id,
        token_ids=[],
        loss_mask=[],
        behaviour_logprobs=[],
        policy_versions=[],
        prompt_length=0,
        status="error",
        error=error,
        wall_seconds=seconds,
    )
