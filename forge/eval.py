"""`forge eval CONFIG --checkpoint DIR`: play N episodes per task with a saved model and
summarise success, turns, generated tokens and wall time per task as one JSON object."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from forge.config import Config, ConfigError
from forge.types import Trajectory

ON_LOOP = (
    "it ran inline on the event loop (the env sets blocking = False) inside C code, which the watchdog cannot "
    "interrupt, so nothing else could run; an env whose calls can block must leave `blocking` True"
)


def task_summary(trajectories: list[Trajectory], wall_seconds: float, swarm: bool = False) -> dict[str, Any]:
    """Success, turns, tokens and wall time of a task's episodes; with `swarm`, also the
    agent-cluster measures (`forge.metrics.swarm_metrics`)."""
    from forge.metrics import episode_counts, swarm_metrics

    played = [t for t in trajectories if t.status != "lost"]
    extra: dict[str, Any] = swarm_metrics(played) if swarm else {}
    return {
        **episode_counts(trajectories),
        "success_rate": statistics.fmean(t.success for t in played) if played else None,
        "turns_mean": statistics.fmean(t.num_turns for t in played) if played else None,
        "generated_tokens_mean": statistics.fmean(t.generated_tokens for t in played) if played else None,
        "wall_seconds": wall_seconds,
        **extra,
    }


def say_new_errors(task_id: str, trajectories: list[Trajectory], seen: set[str]) -> None:
    """Print the first episode error (or cut) of each kind once, with the env's own file:line,
    as a training run does: a success rate of 0 from an env that raised is not the model's."""
    from forge.env.errors import error_headline, error_kind
    from forge.failures import say

    for trajectory in trajectories:
        if trajectory.status == "lost" or not trajectory.error:
            continue
        kind = error_kind(trajectory.error)
        if kind not in seen:
            seen.add(kind)
            what = "an episode errored" if trajectory.status == "error" else "an episode was cut short"
            say(
                f"forge: task {task_id!r}: {what} (each kind is printed once):\n  {error_headline(trajectory.error)}"
            )


def error_verdict(result: dict[str, Any], max_error_fraction: float) -> str | None:
    """Why an eval's numbers are not the model's (every episode lost, or errored episodes
    past `env.max_error_fraction` of those played), or None."""
    played, errored = result["episodes"], result["episodes_error"]
    if not played:
        return f"every one of the {result['episodes_lost']} episodes was lost (the engine or the env's process died)"
    if errored / played > max_error_fraction:
        return (
            f"{errored} of {played} episodes errored ({errored / played:.0%} > env.max_error_fraction="
            f"{max_error_fraction:g}), so the success rate is the env's failure, not the model's. Fix the env "
            f"(its first error is printed above; `forge env check {result['env']}` runs it through the contract)"
        )
    return None


def evaluate(
    cfg: Config,
    checkpoint: str | Path,
    episodes: int,
    num_tasks: int,
    progress: bool = True,
    trajectories: str | Path | None = None,
) -> dict[str, Any]:
    """Play `episodes` episodes of each of the first `num_tasks` tasks of `cfg.env` in this
    process with the model saved in `checkpoint` (a `forge train` output's `final/`, or a folder
    `forge export` wrote). With `trajectories`, every episode is written to that file as the
    rows of a run's trajectories.jsonl (step null), task by task as they finish."""
    from tqdm import tqdm
    from transformers import AutoConfig

    from forge.disk import naming
    from forge.env.preflight import preflight_env
    from forge.env.registry import resolve_env
    from forge.env.tokens import first_prompt_check
    from forge.metrics import write_trajectories
    from forge.models.loading import (
        checkpoint_folder,
        load_tokenizer,
        refuse_tokenizer_past_embeddings,
        run_model_hint,
    )
    from forge.rollout.stuck import LoopGuard, remove_unused_reports, stuck_limit_s
    from forge.rollout.stuck_watch import StuckWatcher, env_source_file
    from forge.rollout.worker import RolloutWorker
    from forge.run.context import start_sandbox
    from forge.run.tasks import load_task_rows

    if episodes < 1 or num_tasks < 1:  # else nothing is played and the verdict blames the engine
        raise ConfigError(
            f"forge eval needs --episodes and --tasks of at least 1 (got {episodes}, {num_tasks})"
        )
    if trajectories is not None and not Path(trajectories).parent.is_dir():  # said before the model loads
        raise FileNotFoundError(
            f"--trajectories {trajectories}: its folder {Path(trajectories).parent} does not exist"
        )
    try:  # a hub id: this machine's Hugging Face cache (its errors name the fix themselves)
        checkpoint = checkpoint_folder(checkpoint, cfg.model.revision, ("--checkpoint", "model.revision"))
    except FileNotFoundError:
        run = run_model_hint(Path(checkpoint))  # a path into a run: where its model is
        raise FileNotFoundError(
            f"--checkpoint {checkpoint} is not a model folder: {run}"
            if run
            else f"--checkpoint {checkpoint} is not a model folder (no config.json); pass a run's final/ folder, "
            "any save_pretrained checkpoint or a hub model id (org/name)"
        ) from None
    # A wrong name, kwargs or reset, and a first prompt with words the checkpoint's tokenizer
    # cannot see or no room left for a reply: one message before the model loads, as forge
    # train's dry run gives (else every episode plays unknown tokens, or errors).
    tokenizer = load_tokenizer(checkpoint)
    refuse_tokenizer_past_embeddings(tokenizer, AutoConfig.from_pretrained(str(checkpoint)), checkpoint)
    prompt_check = first_prompt_check(
        tokenizer,
        str(checkpoint),
        cfg.env.name,
        cfg.rollout.max_context_tokens,
        cfg.rollout.max_new_tokens,
    )
    preflight_env(cfg.env, cfg.seed, prompt_check)
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
    worker.guard = LoopGuard(report_dir, "eval", stuck_limit_s(cfg.env.step_timeout_s, cfg.env.stuck_grace_s))
    env_file = env_source_file(resolve_env(cfg.env.name))
    watcher = StuckWatcher(
        worker.guard.report_path(), cfg.env.name, env_file, cfg.env.step_timeout_s, "forge eval", ON_LOOP
    )
    tasks = load_task_rows(cfg)[:num_tasks]
    rows = None
    if trajectories is not None:
        with naming(trajectories):
            rows = open(trajectories, "w")  # noqa: SIM115 (closed in the finally below)
    started = time.perf_counter()
    per_task: dict[str, Any] = {}
    everything: list[Trajectory] = []
    seen: set[str] = set()
    try:
        for index, task in enumerate(tqdm(tasks, desc="eval", unit="task", disable=not progress)):
            task_started = time.perf_counter()
            played = asyncio.run(worker.rollout([task], episodes))
            say_new_errors(str(task.get("task_id", index)), played, seen)
            per_task[str(task.get("task_id", index))] = task_summary(
                played, time.perf_counter() - task_started, cfg.swarm.enabled
            )
            everything.extend(played)
            if rows is not None:
                with naming(rows.name):
                    write_trajectories(rows, None, played, tokenizer)
    finally:
        if rows is not None:
            rows.close()
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
