"""Where a run's numbers go: metrics.jsonl always, TensorBoard and W&B when configured,
and a few decoded trajectories per step for people to read."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

from forge.disk import naming
from forge.types import Trajectory

# What a run writes into its output folder (the trainers, `forge plot`).
RUN_FILES = ("metrics.jsonl", "trajectories.jsonl", "config.yaml")
RUN_FOLDERS = ("tensorboard", "checkpoints", "final", "plots", "initial_model", "exports")


def claim_output_dir(output: Path, overwrite: bool = False) -> None:
    """Make `output` ready for a new run. One that holds an earlier run is refused (its
    metrics would be appended to, and its checkpoints mixed with this run's), unless
    `overwrite`: then that run's files are removed, and only those."""
    if not check_output_dir(output, overwrite):
        return
    for name in RUN_FILES:
        (output / name).unlink(missing_ok=True)
    for name in RUN_FOLDERS:
        shutil.rmtree(output / name, ignore_errors=True)


def check_output_dir(output: Path, overwrite: bool = False) -> bool:
    """`claim_output_dir`'s refusal, changing nothing (also for `forge train --dry-run`): whether
    `output` holds an earlier run that `overwrite` would remove."""
    earlier = [name for name in ("metrics.jsonl", "checkpoints") if (output / name).exists()]
    if earlier and not overwrite:
        raise FileExistsError(
            f"{output} already holds a run ({' and '.join(earlier)}): continue it with --resume {output} "
            "(if it wrote checkpoints), write this run elsewhere with --output-dir DIR, or replace it with "
            "--overwrite"
        )
    return bool(earlier)


def episode_counts(trajectories: list[Trajectory]) -> dict[str, int]:
    """Episodes played and, of them, errored, cut short and cut short by a time limit; and
    those lost (a training step's metrics and `forge eval` alike)."""
    played = [t for t in trajectories if t.status != "lost"]
    return {
        "episodes": len(played),
        "episodes_error": sum(t.status == "error" for t in played),
        "episodes_truncated": sum(t.status == "truncated" for t in played),
        "episodes_timeout": sum(t.timed_out for t in played),
        "episodes_lost": len(trajectories) - len(played),
    }


def rollout_metrics(trajectories: list[Trajectory], swarm: bool = False) -> dict[str, float]:
    """Per-step episode statistics. Lost episodes (infra failures) are counted, not averaged;
    `swarm` adds the agent-cluster ones (`swarm_metrics`)."""
    played = [t for t in trajectories if t.status != "lost"]
    metrics: dict[str, float] = {name: float(count) for name, count in episode_counts(trajectories).items()}
    if not played:
        return metrics
    solved = [t for t in played if t.success]
    n = len(played)
    metrics.update(
        reward_mean=sum(t.reward for t in played) / n,
        outcome_mean=sum(t.outcome for t in played) / n,
        success_rate=len(solved) / n,
        turns_mean=sum(t.num_turns for t in played) / n,
        episodes_reply_cut=float(sum(t.reply_cut for t in played)),
        # every agent's (sub-agents' too): the engines sampled and held them all
        tokens_generated=float(sum(agent.generated_tokens for t in played for agent in every_agent(t))),
        tokens_total=float(sum(len(agent.token_ids) for t in played for agent in every_agent(t))),
        episode_seconds_mean=sum(t.wall_seconds for t in played) / n,
        tool_seconds_mean=sum(t.tool_seconds for t in played) / n,
    )
    if solved:
        metrics["turns_per_solved"] = sum(t.num_turns for t in solved) / len(solved)
    if any("tool_calls" in t.info for t in played):  # a ToolEnv counts them; other envs say nothing
        metrics.update(
            tool_calls_mean=sum(tool_count(t, "tool_calls") for t in played) / n,
            tool_errors_mean=sum(tool_count(t, "tool_errors") for t in played) / n,
        )
    context = sum(t.info.get("context_tokens", 0) for t in played)
    if context:  # context tokens sent to the engine that it did not prefill: its prefix cache held them
        hits = context - sum(t.info.get("prefill_tokens", 0) for t in played)
        metrics.update(prefix_cache_hit_tokens=float(hits), prefix_cache_hit_rate=hits / context)
    if swarm:
        metrics.update(swarm_metrics(played))
    return metrics


def every_agent(episode: Trajectory) -> list[Trajectory]:
    """An episode's agent and every sub-agent under it, at any level."""
    return [episode, *episode.all_subagents()]


def tool_count(episode: Trajectory, key: str) -> int:
    """An episode's `tool_calls` or `tool_errors`, every agent in it counted: its own (a spawn
    call is one) and every sub-agent's under it."""
    return sum(agent.info.get(key, 0) for agent in every_agent(episode))


def swarm_metrics(played: list[Trajectory]) -> dict[str, float]:
    """Agent clusters: sub-agents spawned per episode and the share that finished, their tool
    calls and errors per episode, critical steps (each turn plus the longest sub-agent run it
    started) against total steps (every agent's turns), and parallelism, total over critical."""
    if not played:
        return {}
    spawned = [sub for t in played for sub in t.all_subagents()]
    critical = sum(t.critical_steps for t in played)
    total = sum(t.total_steps for t in played)
    n = len(played)
    metrics = {
        "subagents_per_episode": len(spawned) / n,
        "critical_steps_mean": critical / n,
        "total_steps_mean": total / n,
        "parallelism": total / critical if critical else 1.0,
        "subagent_tool_calls_mean": sum(sub.info.get("tool_calls", 0) for sub in spawned) / n,
        "subagent_tool_errors_mean": sum(sub.info.get("tool_errors", 0) for sub in spawned) / n,
    }
    if spawned:
        metrics["subagent_success_rate"] = sum(sub.success for sub in spawned) / len(spawned)
    solved = [t for t in played if t.success]
    if solved:
        metrics["critical_steps_per_solved"] = sum(t.critical_steps for t in solved) / len(solved)
        metrics["total_steps_per_solved"] = sum(t.total_steps for t in solved) / len(solved)
    return metrics


def show_step(bar: Any, metrics: dict[str, float], **extra: str) -> None:
    """Advance a run's progress bar with the step's reward and success rate, its errored,
    truncated and lost episode counts (plus `extra`)."""
    bar.set_postfix(
        reward=f"{metrics.get('reward_mean', float('nan')):.3f}",
        success=f"{metrics.get('success_rate', float('nan')):.2f}",
        err=f"{metrics.get('episodes_error', 0):.0f}",
        trunc=f"{metrics.get('episodes_truncated', 0):.0f}",
        lost=f"{metrics.get('episodes_lost', 0):.0f}",
        **extra,
    )
    bar.update(1)


def require_wandb() -> Any:
    """The wandb module `logging.wandb_project` logs through; checked before a run starts
    (its preflight, `--dry-run` too), not once Ray and the models are up."""
    from forge.config import ConfigError

    try:
        import wandb
    except ImportError:
        raise ConfigError(
            "logging.wandb_project is set but wandb is not installed: pip install wandb "
            "(or Forge's extra, forge-rl[wandb]), or leave logging.wandb_project unset"
        ) from None
    return wandb


class MetricsLogger:
    def __init__(
        self,
        output_dir: Path,
        tensorboard: bool = True,
        wandb_project: str | None = None,
        config: dict[str, Any] | None = None,
        trajectories_every: int = 1,
    ) -> None:
        self.output_dir = output_dir
        self.trajectories_every = trajectories_every
        self.jsonl = (output_dir / "metrics.jsonl").open("a")
        self.samples = (output_dir / "trajectories.jsonl").open("a")
        self.tensorboard = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(output_dir / "tensorboard"))
        self.wandb = None
        if wandb_project:
            wandb = require_wandb()
            self.wandb = wandb.init(project=wandb_project, config=config, dir=str(output_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        record = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        with naming(self.jsonl.name):
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard is not None:
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, step)
            self.tensorboard.flush()
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def record_step(
        self,
        step: int,
        metrics: dict[str, float],
        trajectories: list[Trajectory],
        tokenizer: Any,
        samples: int,
    ) -> None:
        """The step's metrics and, on every `trajectories_every`-th step, the first `samples`
        of its episodes, decoded."""
        self.log(step, metrics)
        if step % self.trajectories_every == 0:
            with naming(self.samples.name):
                self.log_trajectories(step, trajectories, tokenizer, samples)

    def log_trajectories(self, step: int, trajectories: list[Trajectory], tokenizer: Any, limit: int) -> None:
        write_trajectories(self.samples, step, trajectories[:limit], tokenizer)

    def close(self) -> None:
        self.jsonl.close()
        self.samples.close()
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def write_trajectories(handle: Any, step: int | None, trajectories: list[Trajectory], tokenizer: Any) -> None:
    """Episodes as trajectories.jsonl rows, decoded (`forge eval --trajectories` writes step None)."""
    for trajectory in trajectories:
        turns = []
        for turn in trajectory.turns:
            turns.append(
                {
                    "generated": tokenizer.decode(trajectory.token_ids[turn.start : turn.end]),
                    "observation": tokenizer.decode(trajectory.token_ids[turn.end : turn.obs_end]),
                    "truncated": turn.truncated,
                }
            )
        handle.write(
            json.dumps(
                {
                    "step": step,
                    "task_id": trajectory.task_id,
                    "prompt": tokenizer.decode(trajectory.token_ids[: trajectory.prompt_length]),
                    "turns": turns,
                    "outcome": trajectory.outcome,
                    "reward": trajectory.reward,
                    "success": trajectory.success,
                    "status": trajectory.status,
                    "error": trajectory.error,
                    # The env's close() failed (the episode stands): forge.env.closing.
                    **(
                        {"close_error": trajectory.info["close_error"]}
                        if trajectory.info.get("close_error")
                        else {}
                    ),
                    **(
                        {
                            "subagents": [
                                _decoded_subagent(sub, tokenizer) for sub in trajectory.all_subagents()
                            ]
                        }
                        if trajectory.subagents
                        else {}
                    ),
                }
            )
            + "\n"
        )
    handle.flush()


def _decoded_subagent(sub: Trajectory, tokenizer: Any) -> dict[str, Any]:
    """A sub-agent in trajectories.jsonl: where it hangs, its prompt, replies and answer."""
    return {
        "depth": sub.depth,
        "parent_turn": sub.parent_turn,
        "prompt": tokenizer.decode(sub.token_ids[: sub.prompt_length]),
        "generated": [tokenizer.decode(sub.token_ids[turn.start : turn.end]) for turn in sub.turns],
        "answer": sub.info.get("answer"),
        "success": sub.success,
        "status": sub.status,
        "error": sub.error,
    }


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
