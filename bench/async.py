"""Sync against async training on the smoke workload, in one run.

Both modes train configs/smoke.yaml (its 300 steps, unless `--steps` says otherwise) from
the same seed, `--repeats` times, alternating sync and async so that load from anything
else on the machine falls on both alike. Each mode runs with every rollout layout in
`--workers` (rollout.num_workers; default 1 and 2) and is judged at its fastest one: on 2
cores sync is fastest with 2 workers (rollout, on its critical path, gets both cores),
async with 1 (one trainer and one worker process, each with a core, instead of three
processes time-sharing two). Every layout's numbers are reported too, under `layouts`, and
`speedup_same_layout` compares the modes layout by layout.

Rates are taken between the first and the last step, so actor start-up is left out; the
success rate is the mean over the last `--last` steps. A layout reports its median run by
steps_per_minute (every run is listed under `runs`) and the mean final success rate over
its runs. `speedup` is the ratio of the two modes' best medians; `speedup_paired` lists,
per repeat, the async run against the sync run of the same repeat (the machine's speed
drifts over minutes, so neighbours compare fairer than medians taken far apart). Prints
one JSON object and writes bench/results/async.json.

    python -m bench.async              # 300 steps, 3 runs per mode and layout (~8 minutes)

Committed result (bench/results/async.json, re-measured on an idle machine): async with 1
worker 829 steps per minute against sync with 2 workers 800, speedup 1.04x (pairs 1.02 /
0.995 / 1.07); final success 0.93 async (one run of three at 0.80), 0.998 sync; layout by
layout 1.04x (1 worker) and 1.01x (2 workers). The run before gave 1011 against 963, 1.05x,
with train.skip_zero_advantage, the default since it came in. Skipping the samples with zero
advantage halves the trainer's time, which is what async hides behind rollout, so sync
gained most (630 -> 963 steps per minute, async 885 -> 1011). Before it
(bench/results/async_skip_off.json): async 885 against sync 630, 1.41x (pairs 1.51 / 1.36
/ 1.39), 1.53x and 1.22x layout by layout; two earlier runs gave 1.35x and 1.47x.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench.report import run_timing, save_result
from forge.config import load_config
from forge.run.launch import train


def summarize(records: list[dict], last: int) -> dict[str, float]:
    return {
        **run_timing(records),
        "final_success_rate": round(statistics.fmean(r["success_rate"] for r in records[-last:]), 4),
        "dropped_stale_groups": records[-1].get("pool/dropped_stale", 0.0),
    }


def paired_speedup(
    sync_runs: list[dict[str, float]], async_runs: list[dict[str, float]]
) -> dict[str, object]:
    """Each async run against the sync run of the same repeat. The machine's speed drifts
    over minutes (identical sync runs ranged 513-695 steps per minute in one bench)."""
    ratios = [
        a["steps_per_minute"] / s["steps_per_minute"] for s, a in zip(sync_runs, async_runs, strict=True)
    ]
    return {"ratios": [round(r, 3) for r in ratios], "median": round(statistics.median(ratios), 3)}


def median_run(found: list[dict[str, float]]) -> dict[str, object]:
    """The median run by steps_per_minute, with the mean final success rate over all runs."""
    ranked = sorted(found, key=lambda run: run["steps_per_minute"])
    median: dict[str, object] = dict(ranked[len(ranked) // 2])
    median["final_success_rate"] = round(statistics.fmean(run["final_success_rate"] for run in found), 4)
    return {**median, "runs": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(Path(__file__).parent.parent / "configs" / "smoke.yaml"))
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps (default: the config's)")
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per mode and layout, alternating sync and async"
    )
    parser.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="rollout.num_workers layouts to run"
    )
    parser.add_argument("--last", type=int, default=10, help="steps averaged for final_success_rate")
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to both modes")
    args = parser.parse_args()
    report: dict[str, object] = {
        "config": Path(args.config).name,
        "steps": args.steps or load_config(args.config, args.overrides).train.max_steps,
        "repeats": args.repeats,
        "workers": args.workers,
        "overrides": args.overrides,
        "cpus": os.cpu_count(),
    }
    modes = ("sync", "async")
    runs: dict[str, dict[int, list[dict[str, float]]]] = {
        mode: {w: [] for w in args.workers} for mode in modes
    }
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for workers in args.workers:
                for mode in modes:
                    steps = [] if args.steps is None else [f"train.max_steps={args.steps}"]
                    cfg = load_config(
                        args.config,
                        [
                            f"train.mode={mode}",
                            f"rollout.num_workers={workers}",
                            *steps,
                            "logging.tensorboard=false",
                            "logging.progress_bar=false",
                            "train.checkpoint_every=0",
                            *args.overrides,
                        ],
                    )
                    out = Path(tmp) / f"{mode}-{workers}-{repeat}"
                    train(cfg, out, progress=False)
                    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
                    runs[mode][workers].append(summarize(records, args.last))
    layouts = {
        mode: {str(w): median_run(found) for w, found in by_layout.items()}
        for mode, by_layout in runs.items()
    }
    best = {mode: max(layouts[mode], key=lambda w: layouts[mode][w]["steps_per_minute"]) for mode in modes}
    for mode in modes:
        report[mode] = {"num_workers": int(best[mode]), **layouts[mode][best[mode]]}
    sync, async_ = report["sync"], report["async"]
    report["speedup"] = round(async_["steps_per_minute"] / sync["steps_per_minute"], 3)  # type: ignore[index]
    report["speedup_paired"] = paired_speedup(
        runs["sync"][int(best["sync"])], runs["async"][int(best["async"])]
    )
    report["success_rate_drop"] = round(sync["final_success_rate"] - async_["final_success_rate"], 4)  # type: ignore[index]
    report["speedup_same_layout"] = {
        w: round(layouts["async"][w]["steps_per_minute"] / layouts["sync"][w]["steps_per_minute"], 3)  # type: ignore[operator]
        for w in layouts["sync"]
    }
    report["layouts"] = layouts
    report["meets_target"] = report["speedup"] >= 1.3 and report["success_rate_drop"] <= 0.05
    save_result(report, Path(__file__).parent / "results" / "async.json")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
