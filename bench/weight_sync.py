"""Seconds to get a new policy version to 2 engines, by the three paths peers use.

A 0.5B-parameter Qwen2 (Qwen2.5-0.5B's shape, random weights), in fp32 and bf16, as full
weights and as LoRA adapters (r=16 on q/k/v/o), goes from the trainer (this process) to 2
engine processes (Ray actors, each holding its own copy of the model) by:

  object_store  what Forge does today: pack, `ray.put` once, each engine gets, unpacks
                and copies into its weights (forge.weights, HFEngine.load_weights' copy)
  folder        the trainer writes safetensors to a folder, each engine reads it and
                copies into its weights (forge serve /forge/weights, SGLang
                update_weights_from_disk)
  broadcast     a torch.distributed group of trainer + engines (gloo here, NCCL on GPU):
                each tensor is broadcast straight into the engines' own weights

Each case runs ROUNDS times with the paths taking turns; the median is reported, with its
ratio to the object store measured in the same rounds. `default` names the fastest path
per case; one within TIE of the object store's median counts as a tie, which the object
store takes (it needs no folder both sides see and no process group). Prints one JSON object and writes bench/results/weight_sync.json.

    python -m bench.weight_sync            (or: forge bench weight_sync)
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.report import save_result

ROUNDS = 5  # the first round of each path pays its warm-up (4.2 s against 0.55 s after it, fp32)
TIE = 0.05
QWEN2_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=4096,
    tie_word_embeddings=True,
)
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def build_model(dtype: torch.dtype, lora: bool, sizes: dict[str, Any]) -> torch.nn.Module:
    """The model without spending minutes on random init: values do not change the cost."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**sizes)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model = model.to_empty(device="cpu")
    model.tie_weights()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    return model


def payload(model: torch.nn.Module, lora: bool) -> dict[str, torch.Tensor]:
    """What one sync sends: the adapters under LoRA, every weight otherwise (tied once)."""
    state = model.state_dict()
    if lora:
        return {name: tensor for name, tensor in state.items() if "lora_" in name}
    seen: set[int] = set()
    unique = {}
    for name, tensor in state.items():
        if tensor.data_ptr() not in seen:
            seen.add(tensor.data_ptr())
            unique[name] = tensor
    return unique


class Engine:
    """An engine process: its own model, loading new weights by each path."""

    def __init__(self, dtype: str, lora: bool, sizes: dict[str, Any]) -> None:
        torch.set_num_threads(1)
        self.model = build_model(getattr(torch, dtype), lora, sizes)
        self.own = self.model.state_dict()

    def from_object_store(self, packed: Any) -> float:
        from forge.rollout.engines.hf import _load_matching
        from forge.weights import unpack_weights

        _load_matching(self.model, unpack_weights(packed))
        return time.perf_counter()

    def from_folder(self, path: str) -> float:
        from forge.rollout.engines.hf import _load_matching
        from forge.rollout.engines.updates import checkpoint_state

        _load_matching(self.model, checkpoint_state(path))
        return time.perf_counter()

    def join_group(self, address: str, rank: int, world_size: int) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo", init_method=address, rank=rank, world_size=world_size)

    def from_broadcast(self, names: list[str]) -> float:
        import torch.distributed as dist

        with torch.no_grad():
            for name in names:
                target = self.own[name]
                if target.is_contiguous():
                    dist.broadcast(target, src=0)
                else:
                    buffer = torch.empty_like(target.contiguous())
                    dist.broadcast(buffer, src=0)
                    target.copy_(buffer)
        return time.perf_counter()

    def leave_group(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def sync_object_store(state: dict[str, torch.Tensor], engines: list[Any], folder: Path) -> float:
    import ray

    from forge.weights import pack_weights

    started = time.perf_counter()
    ref = ray.put(pack_weights(state))
    ray.get([engine.from_object_store.remote(ref) for engine in engines])
    seconds = time.perf_counter() - started
    del ref
    return seconds


def sync_folder(state: dict[str, torch.Tensor], engines: list[Any], folder: Path) -> float:
    import ray
    from safetensors.torch import save_file

    target = folder / "next"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    started = time.perf_counter()
    save_file(
        {name: tensor.contiguous() for name, tensor in state.items()}, str(target / "model.safetensors")
    )
    ray.get([engine.from_folder.remote(str(target)) for engine in engines])
    return time.perf_counter() - started


def sync_broadcast(state: dict[str, torch.Tensor], engines: list[Any], folder: Path) -> float:
    import ray
    import torch.distributed as dist

    names = list(state)
    started = time.perf_counter()
    pending = [engine.from_broadcast.remote(names) for engine in engines]
    with torch.no_grad():
        for name in names:
            dist.broadcast(state[name].contiguous(), src=0)
    ray.get(pending)
    return time.perf_counter() - started


PATHS = {"object_store": sync_object_store, "folder": sync_folder, "broadcast": sync_broadcast}


def run_case(dtype: str, lora: bool, sizes: dict[str, Any], rounds: int, folder: Path) -> dict[str, Any]:
    import ray
    import torch.distributed as dist

    engine_class = ray.remote(num_cpus=0)(Engine)
    engines = [engine_class.remote(dtype, lora, sizes) for _ in range(2)]
    trainer = build_model(getattr(torch, dtype), lora, sizes)
    state = payload(trainer, lora)
    address = f"tcp://127.0.0.1:{free_port()}"
    joined = [engine.join_group.remote(address, rank + 1, 3) for rank, engine in enumerate(engines)]
    dist.init_process_group("gloo", init_method=address, rank=0, world_size=3)
    ray.get(joined)
    times: dict[str, list[float]] = {name: [] for name in PATHS}
    try:
        for round_index in range(rounds):
            order = list(PATHS) if round_index % 2 == 0 else list(reversed(PATHS))
            for name in order:
                gc.collect()
                times[name].append(PATHS[name](state, engines, folder))
    finally:
        ray.get([engine.leave_group.remote() for engine in engines])
        dist.destroy_process_group()
        for engine in engines:
            ray.kill(engine)
    medians = {name: statistics.median(values) for name, values in times.items()}
    base = medians["object_store"]
    return {
        "dtype": dtype,
        "weights": "lora" if lora else "full",
        "parameters_sent": sum(t.numel() for t in state.values()),
        "bytes_sent": sum(t.numel() * t.element_size() for t in state.values()),
        "seconds": {name: round(value, 4) for name, value in medians.items()},
        "all_seconds": {name: [round(v, 4) for v in values] for name, values in times.items()},
        "vs_object_store": {name: round(value / base, 3) for name, value in medians.items()},
        "default": fastest(medians),
    }


def fastest(medians: dict[str, float]) -> str:
    """The fastest path, the object store when none is more than TIE faster than it."""
    best = min(medians, key=medians.get)
    return "object_store" if medians[best] >= medians["object_store"] * (1 - TIE) else best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--layers",
        type=int,
        default=QWEN2_05B["num_hidden_layers"],
        help="fewer layers for a quick check (the results file is for the full 24)",
    )
    parser.add_argument("--output", default="bench/results/weight_sync.json")
    args = parser.parse_args()
    import ray

    sizes = dict(QWEN2_05B, num_hidden_layers=args.layers)
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=True,
        configure_logging=False,
        object_store_memory=3 * 1024**3,
    )
    torch.set_num_threads(1)
    folder = Path(tempfile.mkdtemp(prefix="forge_weight_sync_"))
    cases = []
    try:
        for dtype in ("float32", "bfloat16"):
            for lora in (False, True):
                cases.append(run_case(dtype, lora, sizes, args.rounds, folder))
                print(json.dumps(cases[-1]), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        ray.shutdown()
    result = {
        "model": "Qwen2 with Qwen2.5-0.5B's shape, random weights",
        "layers": args.layers,
        "parameters": None,
        "engines": 2,
        "rounds": args.rounds,
        "group_backend": "gloo",
        "machine": f"CPU, {os.cpu_count()} cores shared with other jobs; /tmp for the folder path",
        "cases": cases,
        "default": {f"{c['dtype']}_{c['weights']}": c["default"] for c in cases},
    }
    from transformers import Qwen2Config

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        meta = AutoModelForCausalLM.from_config(Qwen2Config(**sizes))
    result["parameters"] = sum(p.numel() for p in meta.parameters())
    save_result(result, Path(args.output))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
