"""Warm start against none: RL after `forge sft` on the env's own demonstrations, against RL
from the random-init model, on the README walkthrough's env (examples/reach: reach a number
with +1, +3 and x2 moves).

Each arm runs the walkthrough's commands as a user types them, in subprocesses, from the
same seeds, alternating which arm goes first from seed to seed:

    rl      forge train examples/reach/reach.yaml seed=S
    sft_rl  forge sft examples/reach/reach.yaml seed=S --epochs E
            forge train examples/reach/reach.yaml seed=S model.path=SFT/final

Both train on the env's train split (the demonstrations are the solver's moves on train-split
tasks); every final model, and the warm start before RL, is then scored with `forge eval` on
every pair of the test split, (start, target) pairs no demonstration and no RL episode
started from, against the exact success of a random move each turn (what knowing only the
reply format scores). Reported per arm and seed: the training success curve (mean over each
`--bucket` steps), the success over the first and last `--last` steps, held-out success and
each command's wall time; then the warm start minus random init per seed, the difference and
ratio of the means, and whether sft + train fit `--budget` seconds; with the load average
over the run, since the 2-core machine these ran on is shared.
Prints one JSON object and writes bench/results/warm_start.json.

    python -m bench.warm_start                 # 2 seeds x 2 arms

Committed result (60 RL steps, reach.yaml's tiny Llama, load average 2-11): training success
over the last 10 steps 0.26 / 0.37 after the warm start against 0.19 / 0.15 from random init
(0.30 / 0.26 against 0.03 / 0.02 over the first 10); held-out success on all 21 held-out pairs
0.30 / 0.31 against 0.20 / 0.16 (random moves score 0.23; the warm start before RL 0.27 /
0.24); forge sft then forge train 146 / 86 s. On the tiny Qwen2 the config built before
(load 1.7-3.5): 0.37 / 0.29 held-out against 0.14 / 0.15, 32 / 33 s.
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

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "reach"
CONFIG = EXAMPLE / "reach.yaml"
# The example env by module:Class from its folder, so the bench needs no `pip install -e
# examples/reach`; Forge puts that folder on the rollout workers' path itself.
ENV = ["env.name=reach_env:ReachEnv"]


# Ray gives its raylet a fixed 30 s to register; on a heavily shared machine it sometimes
# does not, and the command is started again (counted in the result as ray_start_retries).
RAY_START_TIMEOUT = "The current node timed out during startup"
RETRIES = {"ray_start": 0}


def forge(*args: str) -> tuple[str, float]:
    """Run one `forge` command; its stdout and wall seconds. A failing command stops the bench."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), str(EXAMPLE), os.environ.get("PYTHONPATH", "")]),
    }
    for attempt in range(3):
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "forge.cli", *args, *(["--overwrite"] if attempt and args[0] == "train" else [])],
                              cwd=REPO, env=env, capture_output=True, text=True)  # fmt: skip
        if done.returncode == 0 or RAY_START_TIMEOUT not in done.stderr:
            break
        RETRIES["ray_start"] += 1
    if done.returncode != 0:
        raise RuntimeError(f"forge {' '.join(args)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return done.stdout, round(time.perf_counter() - started, 1)


def reach_env():  # the example's module, from its folder (the bench needs no install)
    sys.path.insert(0, str(EXAMPLE))
    import reach_env

    return reach_env


def heldout_pairs() -> int:
    return len(reach_env().split_pairs("test"))


def random_moves_success(split: str) -> float:
    """The success of replying a uniformly random move every turn, exactly, over every pair
    of `split`: what a model that learned only the reply format scores, so what a warm
    start must beat to have learned the task itself."""
    reach = reach_env()

    def success(value: int, target: int, turns: int) -> float:
        after = [move(value) for move in reach.MOVES.values()]
        return statistics.fmean(1.0 if v == target else success(v, target, turns - 1) if v < target and turns > 1
                                else 0.0 for v in after)  # fmt: skip

    pairs = reach.split_pairs(split)
    return round(statistics.fmean(success(s, t, len(reach.solve(s, t)) + 1) for s, t in pairs), 4)


def heldout_success(checkpoint: Path, episodes: int) -> float:
    """`forge eval` on every held-out (test split) pair, `episodes` episodes each."""
    tasks = heldout_pairs()
    out, _ = forge("eval", str(CONFIG), *ENV, "env.kwargs.split=test", f"env.num_tasks={tasks}",
                   "--checkpoint", str(checkpoint), "--tasks", str(tasks), "--episodes", str(episodes),
                   "--no-progress")  # fmt: skip
    return round(json.loads(out.strip().splitlines()[-1])["success_rate"], 4)


def curve(run_dir: Path, bucket: int, last: int) -> dict[str, object]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    success = [r["success_rate"] for r in rows]
    return {
        "steps": len(rows),
        "success_curve": [
            round(statistics.fmean(success[i : i + bucket]), 3) for i in range(0, len(success), bucket)
        ],
        "first_success": round(statistics.fmean(success[:last]), 4),
        "final_success": round(statistics.fmean(success[-last:]), 4),
    }


def run_arm(arm: str, seed: int, tmp: Path, args: argparse.Namespace) -> dict[str, object]:
    common = [*ENV, f"seed={seed}", f"train.max_steps={args.steps}", *args.overrides]
    result: dict[str, object] = {"seed": seed}
    model: list[str] = []
    if arm == "sft_rl":
        sft_dir = tmp / f"sft-{seed}"
        _, result["sft_seconds"] = forge("sft", str(CONFIG), *ENV, f"seed={seed}", *args.sft_overrides,
                                         "--epochs", str(args.sft_epochs), "--output-dir", str(sft_dir))  # fmt: skip
        result["sft_heldout_success"] = heldout_success(sft_dir / "final", args.eval_episodes)
        model = [f"model.path={sft_dir / 'final'}"]
    run_dir = tmp / f"{arm}-{seed}"
    _, result["rl_seconds"] = forge("train", str(CONFIG), *common, *model, "logging.progress_bar=false",
                                    "--output-dir", str(run_dir))  # fmt: skip
    result.update(curve(run_dir, args.bucket, args.last))
    result["heldout_success"] = heldout_success(run_dir / "final", args.eval_episodes)
    # The walkthrough's own wall time: forge sft (when run) and forge train, not the evals.
    result["seconds"] = round(float(result.get("sft_seconds", 0.0)) + float(result["rl_seconds"]), 1)  # type: ignore[arg-type]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--steps", type=int, default=60, help="RL steps per run (train.max_steps)")
    parser.add_argument("--sft-epochs", type=int, default=1)
    parser.add_argument(
        "--sft-overrides",
        nargs="*",
        default=["train.learning_rate=0.003"],
        help="overrides for forge sft only (the walkthrough's)",
    )
    parser.add_argument("--bucket", type=int, default=10, help="steps per point of the success curve")
    parser.add_argument("--last", type=int, default=10, help="steps averaged for first/final success")
    parser.add_argument("--eval-episodes", type=int, default=8, help="episodes per held-out pair")
    parser.add_argument(
        "--budget", type=float, default=600.0, help="wall seconds the walkthrough should fit in"
    )
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results" / "warm_start.json")
    parser.add_argument("overrides", nargs="*", help="dotted overrides for both arms' forge train")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, object]]] = {"rl": [], "sft_rl": []}
    load = [round(os.getloadavg()[0], 1)]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for index, seed in enumerate(args.seeds):
            order = ["rl", "sft_rl"] if index % 2 == 0 else ["sft_rl", "rl"]
            for arm in order:
                runs[arm].append(run_arm(arm, seed, Path(tmp), args))
                load.append(round(os.getloadavg()[0], 1))
    report: dict[str, object] = {
        "benchmark": "warm_start",
        "config": "examples/reach/reach.yaml",
        "steps": args.steps,
        "sft_epochs": args.sft_epochs,
        "sft_overrides": args.sft_overrides,
        "overrides": args.overrides,
        "seeds": args.seeds,
        "cpus": os.cpu_count(),
        "load_average_1min": load,
        "total_seconds": round(time.perf_counter() - started, 1),
        "ray_start_retries": RETRIES["ray_start"],
    }
    report["heldout_pairs"] = heldout_pairs()
    report["random_moves_heldout_success"] = random_moves_success("test")
    for arm, found in runs.items():
        report[arm] = {
            "first_success_mean": round(statistics.fmean(r["first_success"] for r in found), 4),  # type: ignore[misc]
            "final_success_mean": round(statistics.fmean(r["final_success"] for r in found), 4),  # type: ignore[misc]
            "heldout_success_mean": round(statistics.fmean(r["heldout_success"] for r in found), 4),  # type: ignore[misc]
            "seconds_mean": round(statistics.fmean(r["seconds"] for r in found), 1),  # type: ignore[misc]
            "seconds_max": max(r["seconds"] for r in found),  # type: ignore[type-var]
            "runs": found,
        }
    # Warm start against none, seed by seed (the same seed's two runs), then over the seeds.
    pairs = list(zip(runs["sft_rl"], runs["rl"], strict=True))
    report["comparison"] = {
        key: {
            "per_seed": {str(w["seed"]): round(float(w[key]) - float(r[key]), 4) for w, r in pairs},  # type: ignore[arg-type]
            "difference": round(report["sft_rl"][f"{key}_mean"] - report["rl"][f"{key}_mean"], 4),  # type: ignore[index]
            "ratio": round(report["sft_rl"][f"{key}_mean"] / max(report["rl"][f"{key}_mean"], 1e-4), 2),  # type: ignore[index]
        }
        for key in ("final_success", "heldout_success")
    }
    report["comparison"]["warm_start_wins_every_seed"] = all(  # type: ignore[index]
        w["final_success"] > r["final_success"] and w["heldout_success"] > r["heldout_success"]
        for w, r in pairs  # type: ignore[operator]
    )
    report["walkthrough_within_budget"] = all(float(w["seconds"]) <= args.budget for w in runs["sft_rl"])  # type: ignore[arg-type]
    report["budget_seconds"] = args.budget
    save_result(report, args.output)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
