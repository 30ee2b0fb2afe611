"""Benchmark: does speed shaping make an agent finish in fewer turns without losing success?

Two training runs through the real orchestrator (`forge.orchestrator.train`), equal step
budget and seed, CPU, tiny random-init Qwen2: `plain` (0/1 outcome) and `shaped` (outcome
plus the speed term on turns against the group median, default advantage path). The task
is guess-the-number with twice as many turns as numbers, so a slow strategy (a linear
scan, or guessing at random within the range) also succeeds and the plain reward is
indifferent to speed once episodes succeed.

Each final policy is then evaluated on the same held-out tasks with the real rollout
code. Per run: success_rate, turns_per_solved, wall_seconds_per_solved (eval episodes),
plus the same numbers over the last fifth of training steps; `turns_reduction` = 1 -
shaped / plain turns_per_solved. Prints one JSON object and writes
bench/results/speed_shaping.json. Run: python -m bench.speed_shaping [--steps N]
[--speed-weight W] [--learning-rate LR]; both runs take about 6 minutes each on 2 cores.

The speed weight sets how much success the shaped policy may trade for speed (up to
w / (1 + w) of its successes, see forge/reward/shaping.py); run it with --speed-weight 0.9
to watch the trade happen.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from forge.config import Config, load_config

RESULTS = Path(__file__).parent / "results" / "speed_shaping.json"
NUMBERS = 8

BASE = [
    "env.name=guess_number",
    f"env.kwargs.n={NUMBERS}",
    f"rollout.max_turns={2 * NUMBERS}",
    "rollout.max_new_tokens=2",  # a guess is one number token (and the end-of-turn token)
    "rollout.num_workers=1",
    "rollout.tasks_per_step=4",
    "rollout.group_size=8",
    "rollout.temperature=1.0",
    "train.minibatches_per_step=2",
    "train.loss=pg",
    "train.advantage=grpo",
    "trainer.packing=padded",
    "logging.tensorboard=false",
    "logging.progress_bar=false",
    "logging.trajectory_samples=0",
]


def shaping_overrides(speed_weight: float) -> list[str]:
    return ["reward.speed.enabled=true", f"reward.speed.weight={speed_weight}", "reward.speed.measure=turns"]


def build_config(shaped: bool, steps: int, seed: int, learning_rate: float, speed_weight: float) -> Config:
    overrides = [*BASE, f"train.max_steps={steps}", f"seed={seed}", f"train.learning_rate={learning_rate}"]
    return load_config(None, overrides + (shaping_overrides(speed_weight) if shaped else []))


def episode_stats(episodes: list[dict[str, float]]) -> dict[str, float]:
    solved = [e for e in episodes if e["success"]]
    return {
        "episodes": len(episodes),
        "success_rate": len(solved) / len(episodes) if episodes else float("nan"),
        "turns_per_solved": statistics.fmean(e["turns"] for e in solved) if solved else float("nan"),
        "wall_seconds_per_solved": statistics.fmean(e["wall_seconds"] for e in solved)
        if solved
        else float("nan"),
    }


def evaluate(cfg: Config, checkpoint: Path, tasks_count: int, group_size: int) -> dict[str, float]:
    """Play the held-out tasks with the final policy through the real rollout worker."""
    from forge.orchestrator import load_task_rows
    from forge.rollout.worker import RolloutWorker

    eval_cfg = cfg.model_copy(deep=True)
    eval_cfg.seed = cfg.seed + 7919  # tasks neither run trained on
    eval_cfg.env.num_tasks = tasks_count
    tasks = load_task_rows(eval_cfg)
    worker = RolloutWorker(
        str(checkpoint), cfg.model, cfg.env, cfg.rollout, cfg.reward.success_threshold, seed=eval_cfg.seed
    )
    trajectories = asyncio.run(worker.rollout(tasks, group_size))
    played = [t for t in trajectories if t.status != "lost"]
    return episode_stats(
        [{"success": t.success, "turns": t.num_turns, "wall_seconds": t.wall_seconds} for t in played]
    )


def training_tail(metrics_file: Path, fraction: float = 0.2) -> dict[str, float]:
    """Step-weighted success and turns over the last `fraction` of training steps."""
    rows = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    tail = rows[-max(1, int(len(rows) * fraction)) :]
    episodes = sum(r["episodes"] for r in tail)
    solved = sum(r["success_rate"] * r["episodes"] for r in tail)
    solved_turns = sum(r.get("turns_per_solved", 0.0) * r["success_rate"] * r["episodes"] for r in tail)
    return {
        "steps": len(tail),
        "success_rate": solved / episodes if episodes else float("nan"),
        "turns_per_solved": solved_turns / solved if solved else float("nan"),
        "reward_speed_mean": statistics.fmean(r.get("reward/speed", 0.0) for r in tail),
    }


def run(name: str, shaped: bool, args: argparse.Namespace, workdir: Path) -> dict:
    from forge.orchestrator import train

    cfg = build_config(shaped, args.steps, args.seed, args.learning_rate, args.speed_weight)
    started = time.perf_counter()
    result = train(cfg, workdir / name, progress=False)
    train_seconds = time.perf_counter() - started
    evaluation = evaluate(cfg, result.checkpoint, args.eval_tasks, args.eval_group)
    return {
        **{k: evaluation[k] for k in ("success_rate", "turns_per_solved", "wall_seconds_per_solved")},
        "eval_episodes": evaluation["episodes"],
        "train_tail": training_tail(workdir / name / "metrics.jsonl"),
        "train_seconds": train_seconds,
        "overrides": shaping_overrides(args.speed_weight) if shaped else [],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=250, help="training steps per run (equal for both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--learning-rate", type=float, default=4e-3)
    parser.add_argument(
        "--speed-weight", type=float, default=0.2, help="reward.speed.weight of the shaped run"
    )
    parser.add_argument("--eval-tasks", type=int, default=32)
    parser.add_argument("--eval-group", type=int, default=8, help="episodes per held-out task")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="forge-speed-") as tmp:
        runs = {
            name: run(name, shaped, args, Path(tmp)) for name, shaped in (("plain", False), ("shaped", True))
        }
    plain, shaped = runs["plain"], runs["shaped"]
    reduction = 1.0 - shaped["turns_per_solved"] / plain["turns_per_solved"]
    success_drop = plain["success_rate"] - shaped["success_rate"]
    result = {
        "benchmark": "speed_shaping",
        "task": f"guess_number n={NUMBERS}, max_turns={2 * NUMBERS}",
        "steps": args.steps,
        "seed": args.seed,
        "learning_rate": args.learning_rate,
        "speed_weight": args.speed_weight,
        "base_overrides": BASE,
        "plain": plain,
        "shaped": shaped,
        "turns_reduction": reduction,
        "success_rate_drop": success_drop,
        "meets_target": bool(reduction >= 0.25 and success_drop <= 0.05),
        "target": "turns_reduction >= 0.25 with success_rate no more than 0.05 lower",
        "total_seconds": time.perf_counter() - started,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n")
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
