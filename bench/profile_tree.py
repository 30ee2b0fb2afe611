"""Where a training step's time goes, padded against tree, for one `bench.tree` workload:
torch.profiler over one step after two warm-up steps (flex attention compiled), the top
operators by self time on the device (CPU time on CPU). Prints tables and one JSON line.

Run: python -m bench.profile_tree --device cuda --dtype bfloat16 --attention flex --model wide
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from bench.tree import MODELS, WORKLOADS, Setup, make_trainer, workload_samples
from forge.models.tiny import save_tiny_checkpoint


def profile_step(packing: str, model_dir: Path, setup: Setup, workload: str, top: int) -> dict:
    trainer = make_trainer(packing, model_dir, setup)
    samples = workload_samples(workload, model_dir)
    cuda = setup.device == "cuda"
    for _ in range(2):
        trainer.train_step(samples)
    if cuda:
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        started = time.perf_counter()
        metrics = trainer.train_step(samples)
        if cuda:
            torch.cuda.synchronize()
        seconds = time.perf_counter() - started
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = prof.key_averages()
    print(f"== {workload} / {packing}: {seconds:.3f} s, {metrics['tokens_computed']:.0f} tokens")
    print(events.table(sort_by=key, row_limit=top, max_name_column_width=60))
    device_us = sum(e.self_device_time_total for e in events) if cuda else 0
    rows = sorted(events, key=lambda e: getattr(e, key), reverse=True)[:top]
    return {
        "step_seconds": round(seconds, 4),
        "tokens_computed": int(metrics["tokens_computed"]),
        "microbatches": int(metrics["microbatches"]),
        "device_busy_seconds": round(device_us / 1e6, 4),
        "top": [
            {
                "name": e.key[:80],
                "calls": e.count,
                "self_ms": round(getattr(e, key) / 1000, 2),
            }
            for e in rows
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--attention", choices=["dense", "flex"], default="dense")
    parser.add_argument("--model", choices=list(MODELS), default="tiny")
    parser.add_argument("--workload", choices=list(WORKLOADS), default="agent_per_call")
    parser.add_argument("--packings", nargs="+", choices=["padded", "tree"], default=["padded", "tree"])
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--output", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()
    setup = Setup(args.device, args.dtype, args.attention, args.model)
    result = {"setup": vars(setup), "workload": args.workload}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = save_tiny_checkpoint(MODELS[args.model], Path(scratch) / "model")
        for packing in args.packings:
            result[packing] = profile_step(packing, model_dir, setup, args.workload, args.top)
            if args.output:  # after each packing: a run cut short keeps what it finished
                args.output.write_text(json.dumps(result) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
