"""Static caches and `torch.compile` on the decode step (issue 18, item 3), on this machine's CPU.

The bench model of `bench.generation` (4-layer hidden-256 Qwen2, fp32, sdpa) samples a group of
8 x 128 new tokens from one P-token prompt, each way, alternated in rounds in one process:

  forge            Forge's engine as shipped (its growing in-place cache, eager forward)
  forge_compiled   the same engine with the model's forward under torch.compile(dynamic=True)
  generate         model.generate with its dynamic cache
  generate_static  model.generate with cache_implementation="static" (pre-allocated), eager
  generate_static_compiled  the same, compiled as transformers does it on a GPU (forced on CPU)

Compilation happens in a warm-up round, reported apart (`compile_s`). Each way keeps its fastest
round, in wall seconds and in this thread's CPU seconds (the work itself on a crowded machine);
ratios are `forge` over that way (below 1: that way is slower). The load average is recorded.

    python -m bench.decode_compile [--threads 1] [--repeats 3] [--prompt 256]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from bench.generation import NEW_TOKENS, forge_group, hf_sample, prompt_of, quiet_gc, save_checkpoint
from bench.report import save_result
from forge.config import ModelConfig
from forge.models.loading import load_model, quiet_transformers
from forge.rollout.engines.hf import HFEngine

RESULTS = Path(__file__).parent / "results"
SAMPLES = 8


def generate_run(model, prompt: list[int], **options) -> Callable[[], None]:
    def run() -> None:
        new = hf_sample(model, torch.tensor([prompt] * SAMPLES), NEW_TOKENS, **options)
        assert new.shape == (SAMPLES, NEW_TOKENS)

    return run


def seconds(run: Callable[[], object]) -> tuple[float, float]:
    """Wall seconds and this thread's CPU seconds (at one torch thread all the work is on this
    thread; the CPU clock stops while other processes hold the core, so it shows the work)."""
    with quiet_gc():
        started, started_cpu = time.perf_counter(), time.thread_time()
        run()
        return time.perf_counter() - started, time.thread_time() - started_cpu


def main(threads: int, repeats: int, prompt_tokens: int, ways: list[str] | None, output: Path) -> dict:
    from transformers import CompileConfig

    torch.set_num_threads(threads)
    quiet_transformers()
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp))
        model = load_model(path, ModelConfig(path=str(path)), attn_implementation="sdpa").eval()
        compiled_model = load_model(path, ModelConfig(path=str(path)), attn_implementation="sdpa").eval()
        compiled_model.forward = torch.compile(compiled_model.forward, dynamic=True)
        prompt = prompt_of(prompt_tokens, salt=prompt_tokens)
        forced = CompileConfig(fullgraph=False, dynamic=False)
        forced._compile_all_devices = True  # transformers compiles only on accelerators by default
        runs = {
            "forge": forge_group(HFEngine(model, [10**9], 0, seed=0), prompt, SAMPLES),
            "forge_compiled": forge_group(HFEngine(compiled_model, [10**9], 0, seed=0), prompt, SAMPLES),
            "generate": generate_run(model, prompt),
            "generate_static": generate_run(
                model, prompt, cache_implementation="static", disable_compile=True
            ),
            "generate_static_compiled": generate_run(
                model, prompt, cache_implementation="static", compile_config=forced
            ),
        }
        runs = {name: run for name, run in runs.items() if not ways or name in ways}
        found: dict[str, list[tuple[float, float]]] = {name: [] for name in runs}
        warm: dict[str, float] = {}
        with torch.no_grad():
            for name, run in runs.items():  # warm-up; compiles where a way compiles
                warm[name] = seconds(run)[0]
                print(f"warm-up {name}: {warm[name]:.1f}s", file=sys.stderr, flush=True)
            for _ in range(repeats):
                for name, run in runs.items():
                    found[name].append(seconds(run))
                    print(f"{name}: {found[name][-1]}", file=sys.stderr, flush=True)
    best = {name: min(wall for wall, _ in times) for name, times in found.items()}
    best_cpu = {name: min(cpu for _, cpu in times) for name, times in found.items()}
    report = {
        "what": __doc__.split("\n\n")[0],
        "model": "qwen2 4 layers, hidden 256, 4 heads (2 kv), vocab 512, fp32, sdpa, random init",
        "torch": torch.__version__,
        "torch_threads": threads,
        "cpus": os.cpu_count(),
        "load_avg_at_start": [round(x, 2) for x in load_start],
        "load_avg_at_end": [round(x, 2) for x in os.getloadavg()],
        "prompt_tokens": prompt_tokens,
        "samples": SAMPLES,
        "new_tokens": NEW_TOKENS,
        "repeats": repeats,
        "ways": {
            name: {
                "seconds": round(best[name], 4),
                "seconds_all_rounds": [round(wall, 3) for wall, _ in found[name]],
                "cpu_s": round(best_cpu[name], 4),
                "cpu_s_all_rounds": [round(cpu, 3) for _, cpu in found[name]],
                "warm_up_s": round(warm[name], 3),
                "compile_s": round(max(warm[name] - best[name], 0.0), 3),
                "forge_over_this": round(best["forge"] / best[name], 3) if "forge" in best else None,
                "forge_over_this_cpu": round(best_cpu["forge"] / best_cpu[name], 3)
                if "forge" in best
                else None,
            }
            for name in runs
        },
    }
    save_result(report, output)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens")
    parser.add_argument("--ways", nargs="*", help="a subset of the ways (names above)")
    parser.add_argument("--output", type=Path, default=RESULTS / "decode-compile.json")
    args = parser.parse_args()
    main(args.threads, args.repeats, args.prompt, args.ways, args.output)
