"""Training from agent programs: the harness starts episodes on the gateway, runs one agent
process per episode against it, and trains on every recorded model call.

The gateway's engine lives in this (driver) process, or with `rollout.engine: server |
remote` the gateway routes its calls to engine servers (`forge.rollout.engines.router`);
the trainer is a Ray actor whose versioned weights go to the engine(s) after every step.
"""

from __future__ import annotations

import asyncio
import random
import time
from pathlib import Path
from typing import Any

import yaml

from forge.config import Config
from forge.failures import FailureWatch, gateway_watches
from forge.gateway.agents import AgentExit, agent_argv, close_unfinished, run_agents
from forge.gateway.episodes import Episode, EpisodeError, EpisodeStore, episode_samples
from forge.gateway.server import Gateway, GatewayServer
from forge.heap import release_free_heap
from forge.rollout.stuck_watch import env_source_file
from forge.run.cluster import check_resources, start_ray
from forge.run.context import (
    RunResult,
    StepLog,
    becomes_sample,
    checkpoint_due,
    finish,
    make_trainer,
    shape_rewards,
    start_sandbox,
    step_metrics,
    trainer_actors,
)
from forge.run.faults import wait_for_trainer
from forge.run.gateway_guard import GatewayGuard
from forge.run.tasks import TaskStream, load_task_rows


def train_gateway(
    cfg: Config, output_dir: str | Path | None = None, progress: bool | None = None, resume: bool = False
) -> RunResult:
    """`cfg.train.max_steps` steps of sync RL where agent processes play every episode.

    Checkpoints every `train.checkpoint_every` steps like a sync run (the gateway's engine
    has no RNG state saved, so a resumed run samples other tokens than an uninterrupted one)."""
    import ray

    from forge.train.checkpoint import latest_checkpoint, restore_run

    started = time.perf_counter()
    output = Path(output_dir or cfg.output_dir)
    if resume:
        latest_checkpoint(output)  # nothing to resume: say so before anything starts
    start_sandbox(cfg)  # its envs run in this process
    run = GatewayRun(cfg, output)
    step = done = 0
    try:
        # The trainer loads while the engine and gateway start; the agents wait for it, since a
        # trainer that cannot load would otherwise be found only after they played a whole step.
        wait_for_trainer(run.trainer)
        if resume:
            step = done = restore_run(run)
            run.sync_weights()
    except Exception:
        run.shutdown()
        raise
    log = StepLog(cfg, output, progress, "train (gateway)", done)
    failures, signal = gateway_watches(cfg, from_scratch=done == 0)
    try:
        for step in range(done + 1, cfg.train.max_steps + 1):
            metrics = gateway_step(run, step, failures, log, started)
            signal.observe(step, metrics, last_step=step == cfg.train.max_steps)
        checkpoint = Path(ray.get(run.trainer.save.remote(str(output / "final"))))
    finally:
        try:
            log.close()  # a full disk fails it again: the actors are shut down still
        finally:
            run.shutdown()
    return finish(output, step, checkpoint, started)


def gateway_step(
    run: GatewayRun, step: int, failures: FailureWatch, log: StepLog, started: float
) -> dict[str, float]:
    """Play one step's episodes through the agents, train on every recorded call, load the
    new weights into the engine, record the step and checkpoint when due; returns its metrics."""
    import ray

    cfg = run.cfg
    step_started = time.perf_counter()
    episodes, exits = run.play()
    rollout_seconds = time.perf_counter() - step_started

    trajectories = [episode.to_trajectory(cfg.reward.success_threshold) for episode in episodes]
    played = {
        "gateway_calls": float(sum(len(e.calls) for e in episodes)),
        "agents_failed": float(sum(a.returncode not in (0,) for a in exits.values())),
        "rollout_seconds": rollout_seconds,
    }

    def record_stopped() -> None:  # the step that stops the run: its episodes, nothing trained
        timings = {
            "step_seconds": time.perf_counter() - step_started,
            "wall_seconds": time.perf_counter() - started,
        }
        log.record(step, step_metrics(trajectories, played, timings), trajectories, run.tokenizer)

    failures.observe(step, trajectories, last_step=step == cfg.train.max_steps, before_stop=record_stopped)
    reward_metrics, advantages = shape_rewards(run.shaper, trajectories, cfg)
    # Per call, but of the episodes the other modes' to_samples would train (train.mask_truncated).
    kept = [i for i, t in enumerate(trajectories) if becomes_sample(t, cfg.train.mask_truncated)]
    samples = episode_samples([episodes[i] for i in kept], [advantages[i] for i in kept])
    train_metrics = ray.get(run.trainer.train_step.remote(samples))
    sync_started = time.perf_counter()
    version = run.sync_weights()

    gateway_metrics = {
        **played,
        "gateway_samples": float(len(samples)),
        "sync_seconds": time.perf_counter() - sync_started,
        "policy_version": float(version),
        "step_seconds": time.perf_counter() - step_started,
        "wall_seconds": time.perf_counter() - started,
        **run.prefix_cache_metrics(),
        **(run.pool.engine_metrics() if run.pool is not None else {}),
    }
    metrics = step_metrics(trajectories, reward_metrics, train_metrics, gateway_metrics)
    log.record(step, metrics, trajectories, run.tokenizer, calls=f"{metrics['gateway_calls']:.0f}")
    if checkpoint_due(step, cfg.train.checkpoint_every, cfg.train.max_steps):
        from forge.train.checkpoint import save_run

        save_run(run, step, cfg.train.keep_checkpoints)
    # The step's generations, episodes and HTTP requests are freed; without this the driver
    # holds ~30 MB of freed heap that the next steps scatter live blocks over (forge.heap).
    release_free_heap()
    return metrics


class GatewayRun:
    """A gateway run's parts: the trainer actor, the engine and gateway server in this
    process, the task stream and reward shaper. A checkpoint saves and restores it like a
    sync run (it has no rollout workers)."""

    def __init__(self, cfg: Config, output: Path) -> None:
        import torch

        from forge.env.latency import with_latency
        from forge.env.registry import resolve_env
        from forge.models.loading import actor_model_source, load_tokenizer, resolve_model_path
        from forge.reward.shaping import RewardShaper

        self.cfg = cfg
        self.workers: list[Any] = []  # agent processes play the episodes
        self.output_dir = output
        output.mkdir(parents=True, exist_ok=True)
        model_path = resolve_model_path(cfg.model, output / "initial_model", seed=cfg.seed)
        model_source = actor_model_source(cfg.model, model_path)  # what the actors resolve (a hub id pinned)
        (output / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        self.argv = agent_argv(cfg.gateway.agent_command)
        self.tasks = TaskStream(load_task_rows(cfg), cfg.seed)
        self.shaper = RewardShaper(cfg.reward)
        self.rng = random.Random(cfg.seed)

        start_ray()
        check_resources(cfg, 0)
        self.pool: Any = None  # the engine servers, when the engine is not in this process
        self.router: Any = None
        if cfg.rollout.engine != "inprocess":
            from forge.rollout.engines.pool import EnginePool

            self.pool = EnginePool.start(cfg, model_source)
        self.trainer = make_trainer(cfg, model_source)
        torch.set_num_threads(cfg.rollout.threads)  # this process plays the rollout worker's part
        self.tokenizer = load_tokenizer(model_path)
        self.engine = self._load_engine(model_path) if self.pool is None else self._route_engines(model_path)
        env_class = resolve_env(cfg.env.name)
        env = cfg.env  # env.latency applies to the agents' env steps too
        self.store = EpisodeStore(
            lambda: with_latency(env_class(**env.kwargs), env.latency, env.step_timeout_s),
            env.step_timeout_s,
            env_name=env_class.__name__,
        )
        self.gateway = run_gateway(cfg, self.engine, self.tokenizer, self.store, self.router)
        self.server = GatewayServer(self.gateway, cfg.gateway.host, cfg.gateway.port).start()
        self.agent_env = {
            "OPENAI_BASE_URL": self.server.base_url,
            "FORGE_GATEWAY_URL": self.server.root_url,
            "FORGE_MAX_TURNS": str(cfg.rollout.max_turns),
        }
        # Last: an env call stuck in C code that holds the GIL ends this process instead of
        # hanging it, and a watcher says which call and where (forge.run.gateway_guard).
        self.guard = GatewayGuard(
            self.server, output, env.name, env_source_file(env_class), env.step_timeout_s, env.stuck_grace_s
        )

    def _load_engine(self, model_path: Path) -> Any:
        from forge.models.loading import generation_end_ids, load_model, resolve_device
        from forge.rollout.engines.hf import HFEngine

        cfg = self.cfg
        # The gateway's engine plays the rollout workers' part, so it follows their GPU reservation.
        device = resolve_device(cfg.model.device, cfg.rollout.num_gpus_per_worker)
        model = load_model(
            model_path,
            cfg.model,
            device=device,
            attn_implementation=cfg.rollout.attn_implementation,
            setting_key="rollout.attn_implementation",
        )
        from forge.rollout.chat import ChatFormat

        return HFEngine(
            model,
            ChatFormat(self.tokenizer, generation_end_ids(model_path)).stop_token_ids,
            self.tokenizer.pad_token_id,
            cfg.rollout.temperature,
            cfg.rollout.top_p,
            seed=cfg.seed,
            max_context_tokens=cfg.rollout.max_context_tokens,
            prefill_chunk_tokens=cfg.rollout.prefill_chunk_tokens,
        )

    def _route_engines(self, model_path: Path) -> Any:
        """A router over the engine servers, for the gateway's calls; returns the sampling
        the servers are asked to use (the run's), which the gateway reports as the engine's."""
        from forge.models.loading import generation_end_ids
        from forge.rollout.chat import ChatFormat
        from forge.rollout.engines.clients import client_factory, run_sampling
        from forge.rollout.engines.router import Router

        sampling = run_sampling(
            self.cfg.rollout, ChatFormat(self.tokenizer, generation_end_ids(model_path)).stop_token_ids
        )
        self._client = client_factory(self.cfg.model, self.cfg.rollout, sampling)
        self.router = Router(
            [self._client(url) for url in self.pool.urls],
            name="gateway",
            max_wait_s=0.01,
            lost_wait_s=self.cfg.rollout.engine_timeout_s,
        )
        self.version = 0
        return sampling

    @property
    def policy_version(self) -> int:
        return self.engine.policy_version if self.pool is None else self.version

    def prefix_cache_metrics(self) -> dict[str, float]:
        """This step's context tokens the `server` engines did not prefill (their prefix
        caches held them), from the engines' counters; none in-process or with remote servers."""
        if self.pool is None or not self.pool.actors:
            return {}
        counters = self.pool.metrics()
        last = getattr(self, "_cache_counters", {})
        # None for each engine not read (busy, or dropped): its next read is its new baseline.
        self._cache_counters = {url: counters.get(url) for url in self.pool.urls}
        return step_cache_metrics(last, counters)

    def play(self) -> tuple[list[Episode], dict[str, AgentExit]]:
        """One step's episodes: `tasks_per_step` tasks x `group_size`, one agent process each."""
        cfg = self.cfg
        if self.router is not None:  # between steps: dropped engines that hold the weights again
            self.server.call(self.router.readmit())
        starts = []
        for task in self.tasks.take(cfg.rollout.tasks_per_step):
            group_id = f"{task.get('task_id', '')}@v{self.policy_version}#{self.rng.getrandbits(32):08x}"
            starts += [(task, group_id)] * cfg.rollout.group_size
        episode_ids, unbuilt = self.server.call(_start_all(self.gateway, starts))
        exits = run_agents(
            self.argv,
            [episode_id for episode_id in episode_ids if episode_id not in unbuilt],
            self.agent_env,
            cfg.gateway.max_concurrent_agents,
            cfg.gateway.agent_timeout_s,
        )
        close_unfinished(self.server, exits)
        return self.server.call(_take(self.store, episode_ids)), exits

    def sync_weights(self) -> int:
        """Load the trainer's latest weights into the gateway's engine; returns their version."""
        import ray

        from forge.weights import unpack_weights

        wrapped, version = ray.get(self.trainer.publish_weights.remote())
        if self.pool is None:
            self.engine.load_weights(unpack_weights(ray.get(wrapped[0])), version)
            return version
        # Between steps no call is in flight: the engines load, the router learns of any
        # engine started in place of a lost one, and vLLM clients stamp the new version.
        self.pool.sync(wrapped, version, self.trainer)
        self.router.take_view(self.pool.view(version), self._client)
        self.version = version
        return version

    def shutdown(self) -> None:
        import ray

        if self.router is not None:
            try:  # the ended episodes' KV is released on the servers, from the loop the router runs on
                self.server.call(self.router.close(), timeout_s=10)
            except Exception:
                pass
        self.guard.stop()
        self.server.stop()
        for actor in trainer_actors(self.trainer):
            ray.kill(actor)
        if self.pool is not None:
            self.pool.shutdown()


def step_cache_metrics(
    last: dict[str, dict[str, float] | None], now: dict[str, dict[str, float]]
) -> dict[str, float]:
    """A step's prefix-cache hits from the engines' counters (by url) read at its end, less
    those read at the last step's end (None: not read then, so this step cannot tell its
    share from the steps' before and leaves the engine out; an engine not known then started
    since, from zero)."""
    hits = prompt = 0.0
    for url, counts in now.items():
        if url in last and last[url] is None:
            continue
        before = last.get(url) or {"prefix_cache_hit_tokens": 0.0, "prompt_tokens": 0.0}
        hits += counts["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"]
        prompt += counts["prompt_tokens"] - before["prompt_tokens"]
    if prompt <= 0:
        return {}
    return {"prefix_cache_hit_tokens": hits, "prefix_cache_hit_rate": hits / prompt}


def run_gateway(cfg: Config, engine: Any, tokenizer: Any, store: EpisodeStore, router: Any = None) -> Gateway:
    """The gateway of a training run: the run's limits, tool parser and sampling rule
    (`gateway.sampling`: override by default, so every call samples with rollout.temperature
    and rollout.top_p, or honour); with engine servers, `router` sends its calls to them."""
    return Gateway(
        engine,
        tokenizer,
        store,
        cfg.rollout.max_new_tokens,
        cfg.rollout.max_context_tokens,
        tool_parser=cfg.gateway.tool_parser,
        sampling=cfg.gateway.sampling,
        router=router,
    )


async def _start_all(
    gateway: Gateway, starts: list[tuple[dict[str, Any], str]]
) -> tuple[list[str], set[str]]:
    """Start one episode per (task, group id), their envs built at the same time (each
    within env.step_timeout_s); returns their ids, and those of the episodes whose env
    could not be built or reset (already ended as errors, no agent to run)."""
    started = await asyncio.gather(
        *(gateway.start_episode(task, group_id) for task, group_id in starts), return_exceptions=True
    )
    episode_ids, unbuilt = [], set()
    for outcome in started:
        if isinstance(outcome, EpisodeError) and outcome.episode_id is not None:
            episode_ids.append(outcome.episode_id)
            unbuilt.add(outcome.episode_id)
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            episode_ids.append(outcome)
    return episode_ids, unbuilt


async def _take(store: EpisodeStore, episode_ids: list[str]) -> list[Episode]:
    # Every agent has exited: a call still generating has no one to read it, so it would be
    # dropped when it ends; it is dropped now rather than waited for (up to env.step_timeout_s).
    store.stop_calls(episode_ids, "the episode's agent exited before this reply was read")
    # A close that failed is noted on its episode's trajectory, and the calls that did end
    # are in: this step trains on the calls a recording of these episodes would hold.
    await store.closed(episode_ids)
    return store.take(episode_ids)
