"""In-process generation against `forge serve` engine actors, on the smoke workload.

Trains configs/smoke.yaml with `rollout.engine=inprocess` and `rollout.engine=server`
(2 engines, 2 workers: the config's), `--steps` steps each, from the same seed, alternated
`--repeats` times so that load from anything else on the machine falls on both alike. Each
run goes through the `forge train` command in its own process (Ray started and stopped
each time). Step 1 (actor start-up) is left out of the medians.

Reported per mode: the median run by step time, with every run under `runs`; `ratio` is
the median over repeats of server's median step time over in-process's of the same repeat
(neighbours compare fairer than medians taken minutes apart), `rollout_ratio` the same for
rollout time alone; load averages are recorded before each run. Prints one JSON object and
writes bench/results/engine_modes.json (or `--output`).

    python -m bench.engine_modes                 # 30 steps, 3 repeats (~6 minutes)
    python -m bench.engine_modes --steps 300 --repeats 1 --output bench/results/engine_modes_300.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.report import save_result

ROOT = Path(__file__).resolve().parent.parent
MODES = ("inprocess", "server")


def summarize(records: list[dict], last_fraction: float = 0.1) -> dict[str, float]:
    later = records[1:]  # step 1 includes actor start-up
    last = max(1, round(len(records) * last_fraction))
    return {
        "steps": len(records),
        "step_seconds_median": round(statistics.median(r["step_seconds"] for r in later), 4),
        "rollout_seconds_median": round(statistics.median(r["rollout_seconds"] for r in later), 4),
        "seconds_after_step_1": round(records[-1]["wall_seconds"] - records[0]["wall_seconds"], 2),
        "wall_seconds": round(records[-1]["wall_seconds"], 2),
        "prefix_cache_hit_rate_mean": round(
            statistics.fmean(r.get("prefix_cache_hit_rate", 0.0) for r in later), 4
        ),
        "episodes_lost": sum(r.get("episodes_lost", 0) for r in records),
        "success_first_10pct": round(statistics.fmean(r["success_rate"] for r in records[:last]), 4),
        "success_last_10pct": round(statistics.fmean(r["success_rate"] for r in records[-last:]), 4),
    }


def run_once(config: str, mode: str, steps: int, overrides: list[str], out: Path) -> dict[str, float]:
    command = [
        sys.executable,
        "-m",
        "forge.cli",
        "train",
        config,
        f"rollout.engine={mode}",
        f"train.max_steps={steps}",
        "logging.progress_bar=false",
        "logging.tensorboard=false",
        *overrides,
        "--output-dir",
        str(out),
        "--overwrite",
    ]
    load = os.getloadavg()[0]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if (
        done.returncode != 0 and "timed out during startup" in done.stderr
    ):  # Ray on a crowded machine: once more
        load = os.getloadavg()[0]
        started = time.monotonic()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        **summarize(records),
        "command_seconds": round(time.monotonic() - started, 2),
        "load_before": load,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default=str(ROOT / "configs" / "smoke.yaml"))
    parser.add_argument("--steps", type=int, default=30, help="train.max_steps of every run")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, alternated")
    parser.add_argument("--output", default=str(ROOT / "bench" / "results" / "engine_modes.json"))
    parser.add_argument("overrides", nargs="*", help="dotted config overrides applied to both modes")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            order = MODES if repeat % 2 == 0 else MODES[::-1]
            for mode in order:
                runs[mode].append(
                    run_once(args.config, mode, args.steps, args.overrides, Path(tmp) / f"{mode}-{repeat}")
                )
    ratios = [
        s["step_seconds_median"] / i["step_seconds_median"]
        for i, s in zip(runs["inprocess"], runs["server"], strict=True)
    ]
    rollout = [
        s["rollout_seconds_median"] / i["rollout_seconds_median"]
        for i, s in zip(runs["inprocess"], runs["server"], strict=True)
    ]
    report: dict[str, object] = {
        "config": Path(args.config).name,
        "steps": args.steps,
        "repeats": args.repeats,
        "overrides": args.overrides,
        "cpus": os.cpu_count(),
        "ratio": round(statistics.median(ratios), 3),
        "ratios": [round(r, 3) for r in ratios],
        "rollout_ratio": round(statistics.median(rollout), 3),
        "rollout_ratios": [round(r, 3) for r in rollout],
    }
    for mode in MODES:
        ranked = sorted(runs[mode], key=lambda run: run["step_seconds_median"])
        report[mode] = {**ranked[len(ranked) // 2], "runs": runs[mode]}
    save_result(report, Path(args.output))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
