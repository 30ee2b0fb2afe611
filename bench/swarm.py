"""Benchmark: does training with the spawn tool (agent clusters) cut the critical path?

parallel_lookup (find the values of 4 keys out of 8): one agent needs a turn per key, a
team that spawns one sub-agent per key is done in 2 critical steps. Two training runs per
seed through the real run loop (`forge.run.launch.train`), seeds alternated, the same
steps, config (configs/swarm.yaml) and speed shaping on critical steps: `single` (no spawn
tool, no PARL terms) and `swarm` (spawn tool, sub-agents on the current policy and trained
on their own sub-task, PARL spawn and finish terms annealed to 0 over the first half).
`--no-spawn-term` adds a third arm, `swarm_no_spawn_term` (reward.parl.spawn_weight=0), to
see whether the orchestrator collapses to serial lookups without the spawn bonus.

Each final policy is then evaluated on held-out tasks through the real rollout worker
(sampling at the training temperature): success_rate, critical_steps_per_solved,
total_steps_per_solved, subagents_per_episode. The top-level `single` and `swarm` pool the
seeds' eval episodes; `runs` holds each run's eval, training tail and its curve (every
`--curve-every` steps: spawns per episode, success, critical steps). Target: critical steps
per solved task at least 2x lower for `swarm` at no loss of success. Prints one JSON object
and writes bench/results/swarm.json (after every run). Run: python -m bench.swarm [--seeds
0 1] [--steps N] [--no-spawn-term] [--set KEY=VALUE ...]. The committed result ran its
arms side by side, one process each, then merged (total_seconds is the slowest part's):
    python -m bench.swarm --steps 150 --arms single --output a.json &
    python -m bench.swarm --steps 150 --arms swarm --output b.json &
    python -m bench.swarm --steps 150 --arms swarm_no_spawn_term --output c.json
    python -m bench.swarm --merge a.json b.json c.json

How the recipe was found (training metrics, mean of the last 10 steps; a 2-core machine
shared with other runs at load 30-55, 4-15 s a step):
  - 4 keys of 8, 6 tokens a reply, lr 1e-3: the swarm run at step 41 solved 6-9% of its
    episodes; sub-agents finished 5-15% of their sub-tasks (a sub-agent must copy its key
    from `find 3`; with the team's advantage as its credit it barely learned to).
  - sub-agents credited for their own sub-task (the default since), 4 keys of 6, 5 tokens,
    lr 2e-3, stopped early for time: single at step 83 solved 10% (5.35 critical steps per
    solved), swarm at step 54 solved 9% (6.0 per solved, 2.3 sub-agents an episode, 21%
    of them finished). Neither had learned to read the keys off the prompt in that budget.
  - 4 keys of 4 (every key of the table, in a shuffled order: no key to pick, only to look
    up without repeats, or to hand out): the committed result.
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

from bench.report import save_result
from forge.config import Config, load_config

RESULTS = Path(__file__).parent / "results" / "swarm.json"
CONFIG = Path(__file__).resolve().parent.parent / "configs" / "swarm.yaml"
ARMS = {
    "single": ["swarm.enabled=false", "reward.parl.enabled=false"],
    "swarm": [],
    "swarm_no_spawn_term": ["reward.parl.spawn_weight=0.0"],
}
QUIET = ["logging.tensorboard=false", "logging.progress_bar=false", "logging.trajectory_samples=2",
         "logging.trajectories_every=10"]  # fmt: skip


def build_config(arm: str, steps: int, seed: int, extra: list[str]) -> Config:
    return load_config(CONFIG, [*QUIET, f"train.max_steps={steps}", f"seed={seed}", *extra, *ARMS[arm]])


def evaluate(cfg: Config, checkpoint: Path, tasks_count: int, group_size: int) -> dict:
    """Held-out tasks (a task seed no run trained on) played by the final policy."""
    from forge.env.registry import resolve_env
    from forge.rollout.worker import RolloutWorker

    env_class = resolve_env(cfg.env.name)
    eval_seed = cfg.seed + 7919
    tasks = env_class.generate_tasks(tasks_count, eval_seed, **cfg.env.kwargs)
    model = cfg.model.model_copy(update={"path": str(checkpoint)})
    worker = RolloutWorker(str(checkpoint), model, cfg.env, cfg.rollout, cfg.reward.success_threshold,
                           seed=eval_seed, sandbox_cfg=cfg.sandbox, swarm_cfg=cfg.swarm)  # fmt: skip
    played = [t for t in asyncio.run(worker.rollout(tasks, group_size)) if t.status != "lost"]
    solved = [t for t in played if t.success]
    return {
        "episodes": len(played),
        "solved": len(solved),
        "success_rate": len(solved) / len(played),
        "critical_steps_per_solved": statistics.fmean(t.critical_steps for t in solved) if solved else None,
        "total_steps_per_solved": statistics.fmean(t.total_steps for t in solved) if solved else None,
        "subagents_per_episode": statistics.fmean(len(t.all_subagents()) for t in played),
    }


def curve(rows: list[dict], every: int) -> list[dict]:
    keys = ("success_rate", "subagents_per_episode", "critical_steps_mean", "reward/parl_weight_scale")
    return [
        {"step": r["step"], **{k: round(r[k], 3) for k in keys if r.get(k) is not None}}
        for r in rows
        if r["step"] % every == 0 or r["step"] == 1
    ]


def training_tail(rows: list[dict], fraction: float = 0.1) -> dict:
    tail = rows[-max(1, int(len(rows) * fraction)) :]
    return {
        "steps": len(tail),
        "success_rate": statistics.fmean(r["success_rate"] for r in tail),
        "critical_steps_mean": statistics.fmean(r.get("critical_steps_mean", r["turns_mean"]) for r in tail),
        "subagents_per_episode": statistics.fmean(r.get("subagents_per_episode", 0.0) for r in tail),
    }


def warm_start(cfg: Config, args: argparse.Namespace, out: Path) -> Path:
    """`forge sft` on the first `--sft-transcripts` of the env's demonstrations for this arm
    (a team's spawn calls and sub-agent turns with swarm.enabled, else one agent's lookups),
    from the training tasks; the same transcript count, epochs and batch for every arm."""
    from forge.sft import env_demonstrations, sft

    data = out / "demonstrations.jsonl"
    out.mkdir(parents=True, exist_ok=True)
    transcripts = env_demonstrations(cfg)[: args.sft_transcripts]
    data.write_text("".join(json.dumps({"messages": messages}) + "\n" for messages in transcripts))
    return sft(cfg, str(data), out / "sft", epochs=args.sft_epochs, batch_size=args.sft_batch)


def run(arm: str, seed: int, args: argparse.Namespace, workdir: Path) -> dict:
    from forge.run.launch import train

    cfg = build_config(arm, args.steps, seed, args.set)
    out = workdir / f"{arm}-{seed}"
    started = time.perf_counter()
    warm: dict = {}
    if args.sft_transcripts:
        start_model = warm_start(cfg, args, workdir / f"{arm}-{seed}-warm")
        warm = {"sft_transcripts": args.sft_transcripts, "sft_epochs": args.sft_epochs,
                "sft_batch": args.sft_batch, "sft_seconds": time.perf_counter() - started}  # fmt: skip
        if args.eval_warm_start:
            warm["eval"] = evaluate(cfg, start_model, args.eval_tasks, args.eval_group)
        cfg = build_config(arm, args.steps, seed, [*args.set, f"model.path={start_model}"])
    started = time.perf_counter()
    result = train(cfg, out, progress=False, overwrite=True)
    train_seconds = time.perf_counter() - started
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {
        "arm": arm,
        "seed": seed,
        "overrides": ARMS[arm] + args.set,
        "warm_start": warm or None,
        "eval": evaluate(cfg, result.checkpoint, args.eval_tasks, args.eval_group),
        "train_tail": training_tail(rows),
        "train_seconds": train_seconds,
        "curve": curve(rows, args.curve_every),
    }


def pooled(runs: list[dict]) -> dict:
    """Eval numbers over every seed's episodes together (per-solved means weighted by solved)."""
    episodes = sum(r["eval"]["episodes"] for r in runs)
    solved = sum(r["eval"]["solved"] for r in runs)
    out = {"success_rate": solved / episodes if episodes else None, "eval_episodes": episodes}
    for key in ("critical_steps_per_solved", "total_steps_per_solved"):
        out[key] = (
            sum((r["eval"][key] or 0.0) * r["eval"]["solved"] for r in runs) / solved if solved else None
        )
    out["subagents_per_episode"] = sum(
        r["eval"]["subagents_per_episode"] * r["eval"]["episodes"] for r in runs
    ) / (episodes or 1)
    return out


def summarize(runs: list[dict], args: argparse.Namespace, seconds: float, complete: bool) -> dict:
    arms = {
        arm: pooled([r for r in runs if r["arm"] == arm]) for arm in dict.fromkeys(r["arm"] for r in runs)
    }
    result = {"benchmark": "swarm", "config": "configs/swarm.yaml", "steps": args.steps, "seeds": args.seeds,
              "complete": complete, "overrides": args.set, **arms}  # fmt: skip
    single, swarm = arms.get("single"), arms.get("swarm")
    if single and swarm and single["critical_steps_per_solved"] and swarm["critical_steps_per_solved"]:
        reduction = single["critical_steps_per_solved"] / swarm["critical_steps_per_solved"]
        drop = single["success_rate"] - swarm["success_rate"]
        result.update(critical_steps_reduction=reduction, success_rate_drop=drop,
                      meets_target=bool(reduction >= 2.0 and drop <= 0.0))  # fmt: skip
    result["target"] = "critical_steps_per_solved at least 2x lower for swarm, success_rate not lower"
    result["runs"] = runs
    result["total_seconds"] = seconds
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150, help="training steps per run (equal for every arm)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument(
        "--no-spawn-term", action="store_true", help="add the swarm arm without PARL's spawn term"
    )
    parser.add_argument("--eval-tasks", type=int, default=32, help="held-out tasks")
    parser.add_argument("--eval-group", type=int, default=4, help="episodes per held-out task")
    parser.add_argument("--sft-transcripts", type=int, default=512,
                        help="warm start: demonstrations per arm for forge sft (0: RL from random init)")  # fmt: skip
    parser.add_argument("--sft-epochs", type=int, default=2)
    parser.add_argument("--sft-batch", type=int, default=16)
    parser.add_argument(
        "--eval-warm-start", action="store_true", help="also evaluate each warm start before RL"
    )
    parser.add_argument("--curve-every", type=int, default=5, help="steps between curve points")
    parser.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                        help="config overrides for every arm")  # fmt: skip
    parser.add_argument("--arms", nargs="+", default=None, choices=sorted(ARMS),
                        help="run only these arms (say one per process, then --merge)")  # fmt: skip
    parser.add_argument(
        "--merge", type=Path, nargs="+", default=None, help="combine result files into --output"
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the runs here (default: a temp dir)")
    args = parser.parse_args()

    if args.merge:
        parts = [json.loads(path.read_text()) for path in args.merge]
        runs = sorted(
            (r for part in parts for r in part["runs"]), key=lambda r: (r["seed"], list(ARMS).index(r["arm"]))
        )
        args.steps, args.set = parts[0]["steps"], parts[0]["overrides"]
        args.seeds = sorted({r["seed"] for r in runs})
        # the parts ran side by side: the slowest is the wall time
        result = summarize(
            runs, args, max(p["total_seconds"] for p in parts), all(p["complete"] for p in parts)
        )
        save_result(result, args.output)
        json.dump({k: v for k, v in result.items() if k != "runs"}, sys.stdout)
        print()
        return
    arms = args.arms or ["single", "swarm"] + (["swarm_no_spawn_term"] if args.no_spawn_term else [])
    started = time.perf_counter()
    runs: list[dict] = []
    jobs = [(seed, arm) for seed in args.seeds for arm in arms]  # alternated: each seed's arms back to back
    with tempfile.TemporaryDirectory(prefix="forge-swarm-") as tmp:
        workdir = args.workdir or Path(tmp)
        for index, (seed, arm) in enumerate(jobs):
            runs.append(run(arm, seed, args, workdir))
            result = summarize(runs, args, time.perf_counter() - started, complete=index == len(jobs) - 1)
            save_result(result, args.output)
    json.dump({k: v for k, v in result.items() if k != "runs"}, sys.stdout)
    print()


if __name__ == "__main__":
    main()
