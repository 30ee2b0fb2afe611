"""Sync against async training on the straggler workload (configs/stragglers.yaml), in one run.

The workload: guess_rounds (1 to 8 rounds a task, long-tailed, so 1 to 24 turns an
episode) with every env step delayed by env.latency (lognormal, median 50 ms, p99 2 s). A
sync step waits for its slowest episode; async keeps the trainer fed from whichever groups
are done. Four arms, from the same seed, alternated within each repeat so that load from
anything else on the machine falls on all alike:

- `sync`: train.mode=sync
- `async`: train.mode=async with the default window (async.window=0.3)
- `async_fifo`: async.window=fifo, groups leave strictly in generation order
- `async_greedy`: async.window=none, whatever groups finished first

Per arm: steps_per_minute between the first and the last step (actor start-up left out),
trainer_idle_fraction (1 - trainer seconds / that span), rollout_idle_fraction (sync: the
share of the span the workers were not rolling out; async: as the loop measures it per
worker), final_success_rate (the final model played on the same `--eval-tasks` tasks x
`--eval-episodes` episodes in every arm, latency off: the trained-on batches are not a
fair sample when the pool prefers short episodes), trained_success_rate (mean over the last
`--last` steps' batches) and staleness, the distribution of policy versions between a
token's generation and the step that trained on it (share of trained tokens per lag; sync
is 0). `speedup` is each async arm's steps per minute over sync's, the median of the
per-repeat ratios. The machine's load average (os.getloadavg) is recorded before and after
every run. Prints one JSON object and writes bench/results/stragglers.json.

    python -m bench.stragglers                 # 50 steps an arm, one round (~15-20 minutes on 2 loaded cores)
    python -m bench.stragglers --steps 20 --repeats 1 --arms sync async   # a quick look

Committed result (bench/results/stragglers.json, 50 steps, load average 38-51): sync 11.5
steps per minute; async 21.2 (1.85x), async_fifo 20.5 (1.79x), async_greedy 28.4 (2.48x,
64 groups dropped as stale); final success 0.352 sync, 0.342 / 0.349 / 0.348 async. The
steps that got there, 20-step runs: 1.06x while a worker call returned all its groups at
once (stragglers-per-call.json), 1.31x with groups streamed as each ended, 2.15x with the
pool holding as many groups as the staleness bound allows (stragglers-streamed.json, the
extra arm async_cap16, since made the default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import run_timing, save_result
from forge.config import Config, load_config
from forge.run.launch import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "stragglers.yaml"
ARMS: dict[str, list[str]] = {
    "sync": ["train.mode=sync"],
    "async": ["train.mode=async"],
    "async_fifo": ["train.mode=async", "async.window=fifo"],
    "async_greedy": ["train.mode=async", "async.window=none"],
}
QUIET = ["logging.tensorboard=false", "logging.progress_bar=false", "train.checkpoint_every=0",
         "logging.trajectory_samples=0"]  # fmt: skip


def staleness_distribution(records: list[dict[str, Any]]) -> dict[str, float]:
    """Share of trained tokens per staleness (policy versions behind the trainer), over
    every step after the first; `staleness_tokens/K` counts come from the async loop."""
    counts: dict[int, float] = {}
    for record in records[1:]:
        for key, value in record.items():
            if key.startswith("staleness_tokens/"):
                lag = int(key.split("/")[1])
                counts[lag] = counts.get(lag, 0.0) + value
    if not counts:  # sync (always on-policy), or an async loop that does not count tokens
        if any("staleness_mean" in r for r in records):
            means = [r["staleness_mean"] for r in records[1:]]
            return {
                "groups_mean": round(statistics.fmean(means), 4),
                "groups_max": max(r["staleness_max"] for r in records),
            }
        return {"0": 1.0}
    total = sum(counts.values())
    return {str(lag): round(counts[lag] / total, 4) for lag in sorted(counts)}


def summarize(records: list[dict[str, Any]], last: int) -> dict[str, Any]:
    later = records[1:]  # step 1 includes actor start-up
    return {
        **run_timing(records),
        "trained_success_rate": round(statistics.fmean(r["success_rate"] for r in records[-last:]), 4),
        "turns_mean": round(statistics.fmean(r["turns_mean"] for r in later), 3),
        "dropped_stale_groups": records[-1].get("pool/dropped_stale", 0.0),
        "staleness": staleness_distribution(records),
    }


def final_success_rate(cfg: Config, checkpoint: Path, tasks: int, episodes: int) -> float:
    """The trained model's success on the first `tasks` tasks, `episodes` each, played in
    this process with the env's latency off (it changes timing, not outcomes)."""
    from forge.rollout.worker import RolloutWorker
    from forge.run.tasks import load_task_rows

    env = cfg.env.model_copy(update={"latency": cfg.env.latency.model_copy(update={"dist": "none"})})
    model = cfg.model.model_copy(update={"path": str(checkpoint)})
    worker = RolloutWorker(str(checkpoint), model, env, cfg.rollout, cfg.reward.success_threshold, cfg.seed + 7,
                           sandbox_cfg=cfg.sandbox)  # fmt: skip
    rows = load_task_rows(cfg)[:tasks]
    played = [t for t in asyncio.run(worker.rollout(rows, episodes)) if t.status != "lost"]
    return statistics.fmean(t.success for t in played)


def run_arm(arm: str, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cfg = load_config(args.config, [*ARMS[arm], f"train.max_steps={args.steps}", *QUIET, *args.overrides])
    load_before = os.getloadavg()
    started = time.perf_counter()
    train(cfg, out, progress=False)
    wall = time.perf_counter() - started
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = summarize(records, args.last)
    result["final_success_rate"] = round(
        final_success_rate(cfg, out / "final", args.eval_tasks, args.eval_episodes), 4
    )
    result["wall_seconds"] = round(wall, 1)
    result["load_average"] = {"before": [round(x, 2) for x in load_before],
                              "after": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    return result


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """An arm over its repeats: the median run by steps per minute, success rates averaged."""
    ranked = sorted(runs, key=lambda run: run["steps_per_minute"])
    median = dict(ranked[len(ranked) // 2])
    for key in ("final_success_rate", "trained_success_rate"):
        median[key] = round(statistics.fmean(run[key] for run in runs), 4)
    return {**median, "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--steps", type=int, default=50, help="train.max_steps of every run")
    parser.add_argument("--repeats", type=int, default=1, help="rounds of all arms, alternated within each")
    parser.add_argument(
        "--arms", nargs="+", default=list(ARMS), help=f"of {', '.join(ARMS)} and --extra-arm names"
    )
    parser.add_argument(
        "--extra-arm",
        action="append",
        default=[],
        metavar="NAME=KEY=VALUE,...",
        help="another arm to run, e.g. async_roomy=train.mode=async,async.max_buffered_groups=16",
    )
    parser.add_argument("--last", type=int, default=10, help="steps averaged for trained_success_rate")
    parser.add_argument("--eval-tasks", type=int, default=64, help="tasks the final model plays")
    parser.add_argument(
        "--eval-episodes", type=int, default=16, help="episodes per task for final_success_rate"
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "stragglers.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to every arm")
    args = parser.parse_args()
    for extra in args.extra_arm:
        name, _, overrides = extra.partition("=")
        ARMS[name] = overrides.split(",")
        args.arms.append(name)
    if unknown := set(args.arms) - set(ARMS):
        parser.error(
            f"unknown arms {sorted(unknown)}: choose from {', '.join(ARMS)} or add one with --extra-arm"
        )
    if "sync" not in args.arms:
        parser.error("--arms must include sync: every ratio is against it")
    report: dict[str, Any] = {
        "config": Path(args.config).name,
        "steps": args.steps,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "cpus": os.cpu_count(),
        "eval": {"tasks": args.eval_tasks, "episodes_per_task": args.eval_episodes},
    }
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in args.arms}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = args.arms if repeat % 2 == 0 else args.arms[::-1]  # no arm always runs first
            for arm in order:
                runs[arm].append(run_arm(arm, args, Path(tmp) / f"{arm}-{repeat}"))
    for arm in args.arms:
        report[arm] = combine(runs[arm])
    sync_runs = runs["sync"]
    report["speedup"] = {
        arm: round(
            statistics.median(
                a["steps_per_minute"] / s["steps_per_minute"]
                for s, a in zip(sync_runs, runs[arm], strict=True)
            ),
            3,
        )  # fmt: skip
        for arm in args.arms
        if arm != "sync"
    }
    report["success_gap"] = {  # sync's final success minus the arm's, in points (0-100)
        arm: round(100 * (report["sync"]["final_success_rate"] - report[arm]["final_success_rate"]), 1)
        for arm in args.arms
        if arm != "sync"
    }
    if "async" in args.arms:
        report["meets_target"] = report["speedup"]["async"] >= 1.5 and report["success_gap"]["async"] <= 3.0
    report["bench_seconds"] = round(time.perf_counter() - started, 1)
    save_result(report, Path(args.output))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
