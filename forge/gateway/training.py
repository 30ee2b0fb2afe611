"""Training from agent programs: the harness starts episodes on the gateway, runs one agent
process per episode against it, and trains on every recorded model call.

The gateway's engine lives in this (driver) process; the trainer is a Ray actor whose
versioned weights are loaded into the engine after every step.
"""

from __future__ import annotations

import json
import os
import random
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from forge.config import Config
from forge.gateway.episodes import Episode, EpisodeStore, episode_samples
from forge.gateway.server import Gateway, GatewayServer


@dataclass
class AgentExit:
    returncode: int | None  # None: killed at the timeout
    stderr_tail: str


def agent_argv(command: str) -> list[str]:
    argv = [part.replace("{python}", sys.executable) for part in shlex.split(command)]
    if not argv:
        raise ValueError("gateway.agent_command is empty; give the command that runs one agent episode")
    return argv


def run_agents(
    argv: list[str], episode_ids: list[str], environment: dict[str, str], max_concurrent: int, timeout_s: float
) -> dict[str, AgentExit]:
    """Run `argv` once per episode (FORGE_EPISODE_ID and OPENAI_API_KEY set to its id), at
    most `max_concurrent` at a time; kill the whole process group of any past `timeout_s`."""
    waiting = list(episode_ids)
    running: dict[str, tuple[subprocess.Popen, float, Any]] = {}
    exits: dict[str, AgentExit] = {}
    try:
        while waiting or running:
            while waiting and len(running) < max_concurrent:
                episode_id = waiting.pop(0)
                stderr = tempfile.TemporaryFile()
                env = {**os.environ, **environment, "FORGE_EPISODE_ID": episode_id, "OPENAI_API_KEY": episode_id}
                try:
                    process = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                               stderr=stderr, start_new_session=True)
                except OSError as exc:
                    raise RuntimeError(f"gateway.agent_command {shlex.join(argv)!r} cannot start: {exc}") from None
                running[episode_id] = (process, time.monotonic(), stderr)
            for episode_id, (process, started, stderr) in list(running.items()):
                returncode = process.poll()
                if returncode is None and time.monotonic() - started < timeout_s:
                    continue
                if returncode is None:
                    _kill_group(process)
                stderr.seek(0)
                exits[episode_id] = AgentExit(returncode, stderr.read()[-2000:].decode(errors="replace"))
                stderr.close()
                del running[episode_id]
            time.sleep(0.02)
    finally:
        for process, _, stderr in running.values():
            _kill_group(process)
            stderr.close()
    return exits


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def close_unfinished(server: GatewayServer, exits: dict[str, AgentExit]) -> None:
    """Episodes whose agent exited without finishing them: a timeout is a truncation, a
    crash is an error; their recorded calls are kept either way."""
    store = server.gateway.store
    for episode_id, agent in exits.items():
        if store.get(episode_id).finished:
            continue
        if agent.returncode is None:
            status, error = "truncated", "the agent ran past gateway.agent_timeout_s and was killed"
        else:
            status, error = "error", f"the agent exited with code {agent.returncode} without finishing: " + (
                agent.stderr_tail.strip().splitlines()[-1] if agent.stderr_tail.strip() else "(no stderr)"
            )
        server.call(server.gateway.abandon_episode(episode_id, status, error))


def run_gateway(cfg: Config, engine: Any, tokenizer: Any, store: EpisodeStore) -> Gateway:
    """The gateway of a training run: the run's limits, tool parser and sampling rule
    (`gateway.sampling`: override by default, so every call samples with rollout.temperature
    and rollout.top_p, or honour)."""
    return Gateway(engine, tokenizer, store, cfg.rollout.max_new_tokens, cfg.rollout.max_context_tokens,
                   tool_parser=cfg.gateway.tool_parser, sampling=cfg.gateway.sampling)


async def _take(store: EpisodeStore, episode_ids: list[str]) -> list[Episode]:
    return store.take(episode_ids)


def train_gateway(
    cfg: Config, output_dir: str | Path | None = None, progress: bool | None = None, resume: bool = False
) -> Any:
    """`cfg.train.max_steps` steps of sync RL where agent processes play every episode.

    Checkpoints every `train.checkpoint_every` steps like a sync run (the gateway's engine
    has no RNG state saved, so a resumed run samples other tokens than an uninterrupted one)."""
    from types import SimpleNamespace

    import ray
    import torch
    from tqdm import tqdm

    from forge.env.registry import resolve_env
    from forge.failures import FailureWatch
    from forge.metrics import MetricsLogger, rollout_metrics, show_step
    from forge.models.loading import load_model, load_tokenizer, resolve_device, resolve_model_path
    from forge.orchestrator import (
        RunResult,
        TaskStream,
        check_resources,
        load_task_rows,
        make_trainer,
        start_ray,
        start_sandbox,
        trainer_actors,
    )
    from forge.reward.shaping import RewardShaper, trajectory_advantages
    from forge.rollout.engines.hf import HFEngine
    from forge.train.checkpoint import latest_checkpoint, restore_run, save_run
    from forge.weights import unpack_weights

    started = time.perf_counter()
    output = Path(output_dir or cfg.output_dir)
    if resume:
        latest_checkpoint(output)  # nothing to resume: say so before anything starts
    start_sandbox(cfg)  # its envs run in this process
    output.mkdir(parents=True, exist_ok=True)
    (output / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    argv = agent_argv(cfg.gateway.agent_command)
    model_path = resolve_model_path(cfg.model, output / "initial_model", seed=cfg.seed)
    tasks = TaskStream(load_task_rows(cfg), cfg.seed)
    shaper = RewardShaper(cfg.reward)
    rng = random.Random(cfg.seed)

    start_ray()
    check_resources(cfg, 0)
    trainer = make_trainer(cfg, model_path)
    torch.set_num_threads(cfg.rollout.threads)  # this process plays the rollout worker's part
    tokenizer = load_tokenizer(model_path)
    # The gateway's engine plays the rollout workers' part, so it follows their GPU reservation.
    device = resolve_device(cfg.model.device, cfg.rollout.num_gpus_per_worker)
    model = load_model(
        model_path, cfg.model, device=device,
        attn_implementation=cfg.rollout.attn_implementation, setting_key="rollout.attn_implementation",
    )
    engine = HFEngine(model, [tokenizer.eos_token_id], tokenizer.pad_token_id,
                      cfg.rollout.temperature, cfg.rollout.top_p, seed=cfg.seed)
    env_class = resolve_env(cfg.env.name)
    store = EpisodeStore(lambda: env_class(**cfg.env.kwargs), cfg.env.step_timeout_s)
    gateway = run_gateway(cfg, engine, tokenizer, store)
    server = GatewayServer(gateway, cfg.gateway.host, cfg.gateway.port).start()
    agent_env = {"OPENAI_BASE_URL": server.base_url, "FORGE_GATEWAY_URL": server.root_url,
                 "FORGE_MAX_TURNS": str(cfg.rollout.max_turns)}

    def stop_services() -> None:
        server.stop()
        for actor in trainer_actors(trainer):
            ray.kill(actor)

    # What a checkpoint saves and restores (a sync run's parts, without rollout workers).
    parts = SimpleNamespace(trainer=trainer, workers=[], tasks=tasks, shaper=shaper, output_dir=output)
    step = first_step = 0
    if resume:
        try:
            step = first_step = restore_run(parts)
            wrapped, version = ray.get(trainer.publish_weights.remote())
            engine.load_weights(unpack_weights(ray.get(wrapped[0])), version)
        except Exception:
            stop_services()
            raise
    logger = MetricsLogger(output, cfg.logging.tensorboard, cfg.logging.wandb_project, cfg.to_dict(),
                           trajectories_every=cfg.logging.trajectories_every)
    show_progress = cfg.logging.progress_bar if progress is None else progress
    bar = tqdm(total=cfg.train.max_steps, desc="train (gateway)", unit="step", disable=not show_progress,
               initial=step)
    failures = FailureWatch(cfg.env.max_error_fraction, cfg.env.error_window_steps)
    try:
        for step in range(first_step + 1, cfg.train.max_steps + 1):
            step_started = rollout_started = time.perf_counter()
            episode_ids = []
            for task in tasks.take(cfg.rollout.tasks_per_step):
                group_id = f"{task.get('task_id', '')}@v{engine.policy_version}#{rng.getrandbits(32):08x}"
                for _ in range(cfg.rollout.group_size):
                    episode_ids.append(server.call(gateway.start_episode(task, group_id)))
            exits = run_agents(argv, episode_ids, agent_env, cfg.gateway.max_concurrent_agents,
                               cfg.gateway.agent_timeout_s)
            close_unfinished(server, exits)
            episodes = server.call(_take(store, episode_ids))
            rollout_seconds = time.perf_counter() - rollout_started

            trajectories = [episode.to_trajectory(cfg.reward.success_threshold) for episode in episodes]
            failures.observe(step, trajectories, last_step=step == cfg.train.max_steps)
            reward_metrics = shaper.shape(trajectories)
            advantages = trajectory_advantages(trajectories, cfg.train.advantage, cfg.train.advantage_std,
                                               cfg.reward.outcome_gap)
            samples = episode_samples(episodes, advantages)
            train_metrics = ray.get(trainer.train_step.remote(samples))
            sync_started = time.perf_counter()
            wrapped, version = ray.get(trainer.publish_weights.remote())
            engine.load_weights(unpack_weights(ray.get(wrapped[0])), version)

            metrics = rollout_metrics(trajectories)
            metrics.update(reward_metrics)
            metrics.update(train_metrics)
            metrics.update(
                gateway_calls=float(sum(len(e.calls) for e in episodes)),
                gateway_samples=float(len(samples)),
                agents_failed=float(sum(a.returncode not in (0,) for a in exits.values())),
                rollout_seconds=rollout_seconds,
                sync_seconds=time.perf_counter() - sync_started,
                policy_version=float(version),
                step_seconds=time.perf_counter() - step_started,
                wall_seconds=time.perf_counter() - started,
            )
            metrics["sandbox_level"] = float(cfg.sandbox.level)
            logger.record_step(step, metrics, trajectories, tokenizer, cfg.logging.trajectory_samples)
            show_step(bar, metrics, calls=f"{metrics['gateway_calls']:.0f}")
            every = cfg.train.checkpoint_every
            if every and (step % every == 0 or step == cfg.train.max_steps):
                save_run(parts, step, cfg.train.keep_checkpoints)
        checkpoint = Path(ray.get(trainer.save.remote(str(output / "final"))))
    finally:
        bar.close()
        logger.close()
        stop_services()
    summary = {"steps": step, "checkpoint": str(checkpoint), "wall_seconds": time.perf_counter() - started}
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return RunResult(output, step, checkpoint, summary["wall_seconds"])
