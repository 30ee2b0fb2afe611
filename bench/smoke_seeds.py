"""How reliably the smoke run learns: the same config over several seeds.

One seed says little about a small RL run: two runs whose weights differ in the last bit
after a few dozen steps sample different episodes from then on, so whether a run ends at
1.0 or stalls at 0.8 turns on the seed and on the machine's arithmetic. This runs
`forge train configs/smoke.yaml seed=S` for each seed (PARALLEL at a time, each in its own
output folder), and reports per seed the success rate over the first and the last 10% of
steps, the share of byte-spelled replies over the first 10% (the failing seeds' usual start
on the tiny qwen2: a step or two move most of the reply mass onto the tokenizer's 256 byte pieces, away from
the words the task is played in), the wall time, and how many seeds pass the smoke
acceptance (last 10% >= 0.9).
Extra arguments are config overrides, applied to every seed. Prints one JSON object and
writes bench/results/smoke_seeds_llama.json (or --output): smoke_seeds.json and
smoke_seeds_10-29.json hold the runs on the tiny qwen2, the smoke model before llama.

    python -m bench.smoke_seeds --seeds 0-9 --parallel 2
    python -m bench.smoke_seeds --seeds 0-4 train.minibatches_per_step=4 --output /tmp/mb4.json
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
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from bench.report import save_result

ROOT = Path(__file__).resolve().parent.parent
PASS = 0.9  # configs/smoke.yaml's acceptance: success over the last 10% of steps


def seed_list(text: str) -> list[int]:
    """`0-9` or `0,3,5` (or a mix) as a list of seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        seeds.extend(range(int(low), int(high or low) + 1))
    return seeds


def success_ends(metrics: Path) -> tuple[float, float, int]:
    """Mean success rate over the first and the last 10% of a run's steps, and its step count."""
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    rates = [row["success_rate"] for row in rows if "success_rate" in row]
    if not rates:
        raise RuntimeError(f"{metrics} holds no success_rate")
    tenth = max(1, len(rates) // 10)
    return statistics.fmean(rates[:tenth]), statistics.fmean(rates[-tenth:]), len(rates)


def episodes_played(metrics: Path) -> int:
    """Every episode the run played (more than steps x a step's batch with rounds: rollout.max_rounds_per_step)."""
    return int(
        sum(json.loads(line).get("episodes", 0) for line in metrics.read_text().splitlines() if line.strip())
    )


def byte_replies(trajectories: Path, tokenizer_dir: Path, last_step: int) -> float:
    """Share of the sampled replies (`logging.trajectory_samples` episodes a step) up to
    `last_step` that the tokenizer spells with byte pieces rather than whole words."""
    from forge.models.loading import load_tokenizer

    # Not AutoTokenizer: for a qwen2 checkpoint transformers 5 swaps in Qwen2Tokenizer, which
    # cannot read the tiny model's tokenizer.json (it encodes its text to nothing).
    tokenizer = load_tokenizer(tokenizer_dir)
    byte_ids = {i for token, i in tokenizer.get_vocab().items() if token.startswith("<0x")}
    replies = [
        turn["generated"]
        for episode in map(json.loads, trajectories.read_text().splitlines())
        if episode["step"] <= last_step
        for turn in episode["turns"]
    ]
    if not replies:
        raise RuntimeError(f"{trajectories} holds no replies up to step {last_step}")
    spelled = sum(any(i in byte_ids for i in tokenizer.encode(r, add_special_tokens=False)) for r in replies)
    return spelled / len(replies)


def run_seed(seed: int, overrides: list[str], folder: Path) -> dict:
    out = folder / f"seed{seed}"
    command = [
        sys.executable,
        "-m",
        "forge.cli",
        "train",
        str(ROOT / "configs" / "smoke.yaml"),
        f"seed={seed}",
    ]
    command += [*overrides, "logging.progress_bar=false", "--output-dir", str(out)]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, cwd=folder)
    seconds = time.monotonic() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        return {"seed": seed, "exit": done.returncode, "seconds": round(seconds, 1), "error": tail}
    first, last, steps = success_ends(out / "metrics.jsonl")
    bytes_first = byte_replies(out / "trajectories.jsonl", out / "initial_model", max(1, steps // 10))
    return {
        "seed": seed,
        "exit": 0,
        "steps": steps,
        "success_first_10pct": round(first, 3),
        "success_last_10pct": round(last, 3),
        "byte_replies_first_10pct": round(bytes_first, 3),
        "episodes": episodes_played(out / "metrics.jsonl"),
        "passed": last >= PASS,
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-9", help="seeds to run: 0-9, or 0,3,5")
    parser.add_argument("--parallel", type=int, default=2, help="runs at a time")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "smoke_seeds_llama.json")
    parser.add_argument("overrides", nargs="*", help="config overrides for every seed (key=value)")
    args = parser.parse_args(argv)
    seeds = seed_list(args.seeds)
    load_start = os.getloadavg()[0]
    # transformers resolves these names lazily, and two threads resolving them at once can
    # fail (ImportError: cannot import name 'AutoTokenizer'): resolve them before the pool.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    with tempfile.TemporaryDirectory(prefix="forge-smoke-seeds-") as folder:
        with ThreadPoolExecutor(max_workers=max(1, args.parallel)) as pool:
            runs = list(pool.map(lambda s: run_seed(s, args.overrides, Path(folder)), seeds))
    finished = [r for r in runs if r["exit"] == 0]
    result = {
        "config": "configs/smoke.yaml",
        "overrides": args.overrides,
        "parallel": args.parallel,
        "cpus": os.cpu_count(),
        "load_avg_at_start": round(load_start, 2),
        "runs": runs,
        "seeds_passed": sum(r["passed"] for r in finished),
        "seeds_run": len(seeds),
        "seeds_failed_to_run": len(seeds) - len(finished),
        "median_last_10pct": round(statistics.median(r["success_last_10pct"] for r in finished), 3)
        if finished
        else None,
    }
    print(json.dumps(result))
    save_result(result, args.output)
    return result


if __name__ == "__main__":
    main()
