"""Chunked prefill (rollout.prefill_chunk_tokens) against one prefill forward, on bench.generation's
CPU model (a random-init Qwen2: 4 layers, hidden 256, vocab 512, fp32).

  speed: short prompts, where the default chunk (2048) leaves the prefill one forward, and 8
         distinct 1024-token prompts, which it splits into 4 chunks: wall seconds of a generate
         call (8 rows x 32 new tokens), chunked and not alternated, each side's fastest round;
  memory: one long prompt (P tokens, 4 new) prefilled in a fresh process per setting: the
         resident-set high-water mark the call adds (VmHWM after less before), and its seconds.

Prints one JSON object and writes bench/results/prefill-chunks.json. One torch thread by
default: on the shared 2-core machine a 2-thread run's times varied up to 6x between rounds
(another process on one core stalls both threads), its memory figures did not.

    python -m bench.prefill_chunks [--threads 1] [--repeats 3] [--long 8192 16384]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.generation import MODELS
from bench.memory import reset_high_water, resident_mb
from bench.report import save_result
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest

RESULTS = Path(__file__).parent / "results"
DEFAULT_CHUNK = 2048
NEW_TOKENS = 32


def build_model(attention: str, positions: int) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(**MODELS["small"], max_position_embeddings=positions, attn_implementation=attention)
    torch.manual_seed(0)
    return Qwen2ForCausalLM(config).float().eval()


def prompt(length: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, MODELS["small"]["vocab_size"], (length,), generator=generator).tolist()


def timed_call(engine: HFEngine, requests: list[GenerationRequest]) -> float:
    started = time.perf_counter()
    engine.generate(requests)
    return time.perf_counter() - started


def speed(attention: str, repeats: int) -> dict:
    """Fastest wall seconds per case, chunked (the default) and one forward, alternated."""
    model = build_model(attention, 4096)
    engines = {
        chunk: HFEngine(model, [], pad_token_id=0, seed=0, prefill_chunk_tokens=chunk)
        for chunk in (DEFAULT_CHUNK, 0)
    }
    cases = {
        "group_P256": [GenerationRequest(prompt(256, 0), NEW_TOKENS) for _ in range(8)],
        "distinct_8xP256": [GenerationRequest(prompt(256, row), NEW_TOKENS) for row in range(8)],
        "distinct_8xP1024": [GenerationRequest(prompt(1024, row), NEW_TOKENS) for row in range(8)],
    }
    out: dict = {}
    for case, requests in cases.items():
        best = {chunk: float("inf") for chunk in engines}
        timed_call(engines[0], requests)  # warm-up
        for _ in range(repeats):
            for chunk, engine in engines.items():
                best[chunk] = min(best[chunk], timed_call(engine, requests))
        out[case] = {
            "chunked_s": round(best[DEFAULT_CHUNK], 3),
            "one_forward_s": round(best[0], 3),
            "ratio": round(best[DEFAULT_CHUNK] / best[0], 3),
        }
    return out


def long_prompt_child(attention: str, length: int, chunk: int) -> dict:
    """In this (fresh) process: the memory and time one long prompt's prefill adds."""
    model = build_model(attention, length + 8)
    engine = HFEngine(model, [], pad_token_id=0, seed=0, prefill_chunk_tokens=chunk)
    engine.generate([GenerationRequest(prompt(64, 1), 2)])  # kernels and allocator warmed
    tokens = prompt(length, 2)
    reset_high_water()
    before = resident_mb("VmRSS")
    seconds = timed_call(engine, [GenerationRequest(tokens, 4)])
    return {"peak_added_mb": round(resident_mb("VmHWM") - before, 1), "seconds": round(seconds, 2)}


def long_prompt(attention: str, length: int, threads: int) -> dict:
    out = {}
    for chunk in (DEFAULT_CHUNK, 0):
        child = [sys.executable, "-m", "bench.prefill_chunks", "--child", attention, str(length), str(chunk)]
        child += ["--threads", str(threads)]
        done = subprocess.run(child, capture_output=True, text=True, check=True)
        out["chunked" if chunk else "one_forward"] = json.loads(done.stdout.strip().splitlines()[-1])
    out["peak_ratio"] = round(out["chunked"]["peak_added_mb"] / out["one_forward"]["peak_added_mb"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long", type=int, nargs="*", default=[8192, 16384])
    parser.add_argument("--attention", nargs="*", default=["sdpa", "eager"])
    parser.add_argument(
        "--eager-long-max", type=int, default=8192, help="eager's n^2 scores past it need GBs"
    )
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, default=RESULTS / "prefill-chunks.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        attention, length, chunk = args.child
        print(json.dumps(long_prompt_child(attention, int(length), int(chunk))))
        return
    from forge.models.loading import quiet_transformers

    quiet_transformers()
    load = Path("/proc/loadavg").read_text().split()[:3]
    result: dict = {"threads": args.threads, "chunk": DEFAULT_CHUNK, "load_before": load}
    for attention in args.attention:
        result[attention] = {"speed": speed(attention, args.repeats)}
        for length in args.long:
            if attention == "eager" and length > args.eager_long_max:
                continue
            result[attention][f"long_P{length}"] = long_prompt(attention, length, args.threads)
    result["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
    save_result(result, args.output)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
