"""Forge's engine against transformers' `model.generate`, on the same model and tokens.

A random-init Qwen2 (4 layers, hidden 256, vocab 512, fp32, sdpa) samples with the same
settings (temperature 1, no top-k, top-p 1, no stop token, so every row makes every token)
in one process at one torch thread count, Forge and `generate` taking turns in each round:

  (a) one prompt of P in {256, 1024, 4096} tokens, 8 samples of 128 new tokens;
  (b) 16 samples of 128 at P=256;
  (c) 8 episodes (a group on one 256-token prompt) of 8 turns: 32 new tokens a turn, then a
      32-token observation. `generate` re-runs each episode's whole history every turn, as a
      user without an engine that keeps KV between turns would;
  (d) one sync training step at P=256 and 1024 (8 samples of 128): Forge's rollout then its
      prefix-tree train step, against `generate` then the padded train step
      (`trainer.packing: padded`) on the same samples.

For every case: wall seconds (the fastest round), generated tokens per second, tokens run
through prefill, decode steps (forwards of one new token a row), and where the time went:
the model's forward (prefill and decode) against everything else, per decode step. Both
sides are timed by the same hooks on the model. `thread_handoff` times Forge's case (a) at
P=256 on the calling thread against inside `asyncio.to_thread`. Prints one JSON object and
writes bench/results/generation.json; `--profile-label` also files the per-step split under
that label in bench/results/generation-profile.json (to compare code before and after).

The machine this ran on is shared: other processes take cores at random moments, so the
sides alternate within each round and each keeps its fastest round.

    python -m bench.generation [--threads 2] [--repeats 3]

`--model small-window`: the same shapes as a Mistral with a sliding window of 1<<17, longer than
the engine's context (rollout.max_context_tokens, CONTEXT here), so it never binds: with
`--compare-copy --no-generate` the engine that shares the group's prompt runs against the one
that copies it and the one that copies it under position-counted window masks (what every
windowed model got before the engine knew its context), alternated.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from bench.report import save_result
from forge.config import ModelConfig, TrainConfig, TrainerConfig
from forge.models.loading import load_model, quiet_transformers
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest
from forge.types import Sample

RESULTS = Path(__file__).parent / "results"
NEW_TOKENS = 128
VOCAB = 512
TURNS, TURN_TOKENS, OBSERVATION_TOKENS, EPISODE_PROMPT = 8, 32, 32, 256
# The targets: at least even everywhere, 1.5x where shared prefixes save most.
TARGETS = {"a_P256": 1.0, "a_P1024": 1.5, "a_P4096": 1.5, "b_P256_16": 1.0, "c_multiturn": 1.5}
STEP_TARGETS = {"step_P256": 1.3, "step_P1024": 2.5}


# The CPU model, and a 0.5B-class one for the GPU run (Qwen2-0.5B's shapes, random init).
MODELS = {
    "small": dict(
        vocab_size=VOCAB,
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=512,
    ),
    "qwen2-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        intermediate_size=4864,
    ),
}
# The small shapes as a Mistral whose window no row reaches (Phi-3-mini-128k declares 262143).
MODELS["small-window"] = dict(MODELS["small"], sliding_window=1 << 17)
CONTEXT = 8192  # the engine's max_context_tokens (and the checkpoint's max_position_embeddings)
# Peak memory bandwidth in GB/s by device name, for the decode bound; --bandwidth-gbs overrides.
BANDWIDTH_GBS = {
    "H200": 4800,
    "H100 SXM": 3350,
    "H100 80GB HBM3": 3350,
    "H100 PCIe": 2000,
    "H100 NVL": 3900,
    "A100-SXM4-80GB": 2039,
    "A100 80GB PCIe": 1935,
    "A100-SXM4-40GB": 1555,
    "A100-PCIE-40GB": 1555,
    "L40S": 864,
    "L4": 300,
    "A10G": 600,
    "RTX 4090": 1008,
}


def save_checkpoint(directory: Path, preset: str = "small") -> Path:
    """The bench model with Forge's tiny tokenizer beside it (the trainer loads both)."""
    from transformers import AutoModelForCausalLM, MistralConfig, Qwen2Config

    from forge.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = (MistralConfig if "sliding_window" in MODELS[preset] else Qwen2Config)(
        **MODELS[preset],
        max_position_embeddings=CONTEXT,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=None,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


class ForwardClock:
    """Time spent inside the model's forward, split into prefill and one-token decode steps,
    in wall seconds and in this thread's CPU seconds. The CPU clock does not run while
    other processes hold the core, so on a busy machine it shows the work itself; at one
    torch thread all of a step's work is on this thread."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.reset()
        self._started = (0.0, 0.0)
        # On a GPU a forward returns once its kernels are queued: wait for them on both sides.
        self._sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else lambda: None
        model.register_forward_pre_hook(self._enter, with_kwargs=True)
        model.register_forward_hook(self._leave, with_kwargs=True)

    def reset(self) -> None:
        self.prefill_s = self.decode_s = self.prefill_cpu_s = self.decode_cpu_s = 0.0
        self.decode_steps = self.prefill_calls = 0

    def _enter(self, module: Any, args: Any, kwargs: dict) -> None:
        self._sync()
        self._started = (time.perf_counter(), time.thread_time())

    def _leave(self, module: Any, args: Any, kwargs: dict, output: Any) -> None:
        self._sync()
        wall, cpu = time.perf_counter() - self._started[0], time.thread_time() - self._started[1]
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is not None and ids.shape[1] == 1:
            self.decode_s += wall
            self.decode_cpu_s += cpu
            self.decode_steps += 1
        else:
            self.prefill_s += wall
            self.prefill_cpu_s += cpu
            self.prefill_calls += 1


@contextlib.contextmanager
def quiet_gc() -> Iterator[None]:
    gc.collect()
    gc.disable()  # as timeit does: a collection landing in one run is noise, not cost
    try:
        yield
    finally:
        gc.enable()


def timed(clock: ForwardClock, run: Callable[[], int]) -> dict[str, float]:
    """Run once; `run` returns the tokens it ran through prefill."""
    clock.reset()
    with quiet_gc():
        started, started_cpu = time.perf_counter(), time.thread_time()
        prefill_tokens = run()
        clock._sync()
        seconds, cpu = time.perf_counter() - started, time.thread_time() - started_cpu
    steps = max(clock.decode_steps, 1)
    return {
        "seconds": seconds,
        "prefill_tokens": prefill_tokens,
        "decode_steps": clock.decode_steps,
        "prefill_forward_s": clock.prefill_s,
        "decode_forward_ms_per_step": 1000 * clock.decode_s / steps,
        "other_ms_per_decode_step": 1000 * (seconds - clock.prefill_s - clock.decode_s) / steps,
        "cpu_s": cpu,
        "decode_forward_cpu_ms_per_step": 1000 * clock.decode_cpu_s / steps,
        "other_cpu_ms_per_decode_step": 1000 * (cpu - clock.prefill_cpu_s - clock.decode_cpu_s) / steps,
    }


def forge_group(engine: HFEngine, prompt: list[int], samples: int) -> Callable[[], int]:
    def run() -> int:
        results = engine.generate([GenerationRequest(list(prompt), NEW_TOKENS) for _ in range(samples)])
        assert all(len(r.token_ids) == NEW_TOKENS for r in results)
        return sum(r.prefill_tokens for r in results)

    return run


def hf_sample(model: Any, contexts: torch.Tensor, new_tokens: int, **options: Any) -> torch.Tensor:
    """`generate` as a user calls it (with `options`, e.g. a cache implementation); returns
    only the new tokens."""
    out = model.generate(
        input_ids=contexts,
        attention_mask=torch.ones_like(contexts),
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=0,
        eos_token_id=None,
        **options,
    )
    return out[:, contexts.shape[1] :]


def hf_group(model: Any, prompt: list[int], samples: int) -> Callable[[], int]:
    def run() -> int:
        contexts = torch.tensor([prompt] * samples, device=model.device)
        new = hf_sample(model, contexts, NEW_TOKENS)
        assert new.shape == (samples, NEW_TOKENS)
        return contexts.numel()

    return run


def observation(episode: int, turn: int) -> list[int]:
    return [(episode * 31 + turn * 7 + i) % (VOCAB - 2) + 1 for i in range(OBSERVATION_TOKENS)]


def forge_episodes(engine: HFEngine, prompt: list[int], episodes: int) -> Callable[[], int]:
    def run() -> int:
        contexts = {f"e{e}": list(prompt) for e in range(episodes)}
        prefill = 0
        for turn in range(TURNS):
            requests = [
                GenerationRequest(ids, TURN_TOKENS, episode_id=name) for name, ids in contexts.items()
            ]
            for e, (request, result) in enumerate(zip(requests, engine.generate(requests), strict=True)):
                prefill += result.prefill_tokens
                contexts[request.episode_id] = request.token_ids + result.token_ids + observation(e, turn)
        for name in contexts:
            engine.release(name)
        return prefill

    return run


def hf_episodes(model: Any, prompt: list[int], episodes: int) -> Callable[[], int]:
    def run() -> int:
        contexts = torch.tensor([prompt] * episodes, device=model.device)
        prefill = 0
        for turn in range(TURNS):
            prefill += contexts.numel()
            new = hf_sample(model, contexts, TURN_TOKENS)
            observations = torch.tensor([observation(e, turn) for e in range(episodes)], device=model.device)
            contexts = torch.cat([contexts, new, observations], dim=1)
        return prefill

    return run


def alternate(runs: dict[str, Callable[[], dict]], repeats: int, keep: bool = False) -> dict[str, Any]:
    """Each side once per round, in turn; each keeps its fastest round (`keep`: all rounds)."""
    found: dict[str, list[dict]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            found[name].append(run())
    if keep:
        return found
    best = {name: min(rounds, key=lambda r: r["seconds"]) for name, rounds in found.items()}
    for name, result in best.items():
        result["seconds_all_rounds"] = [round(r["seconds"], 3) for r in found[name]]
    return best


def rounded(result: dict) -> dict:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}


def compare(
    clock: ForwardClock,
    forge: Callable[[], int],
    hf: Callable[[], int] | None,
    generated: int,
    repeats: int,
    target: float,
    others: dict[str, Callable[[], int]] | None = None,
) -> dict[str, Any]:
    """Forge against generate (`hf`; None: Forge's sides alone), alternated; `others` (more ways,
    e.g. Forge with its group's prompt KV copied into every row) take their turns in the same
    rounds and are reported beside, with Forge's speed over each."""
    sides = {"forge": lambda: timed(clock, forge)}
    if hf is not None:
        sides["generate"] = lambda: timed(clock, hf)
    sides.update({name: (lambda run=run: timed(clock, run)) for name, run in (others or {}).items()})
    rounds = alternate(sides, repeats, keep=True)
    best = {side: min(found, key=lambda r: r["seconds"]) for side, found in rounds.items()}
    for side, result in best.items():
        result["seconds_all_rounds"] = [round(r["seconds"], 3) for r in rounds[side]]
    for result in best.values():
        result["tokens_per_s"] = generated / result["seconds"]
    # Each other side's fastest round over Forge's: wall seconds, and CPU ms per decode step
    # inside the forward (the CPU clock stops while other processes hold the core).
    speedups = {
        side: {
            key: round(best[side][key] / best["forge"][key], 3)
            for key in ("seconds", "decode_forward_cpu_ms_per_step", "cpu_s")
        }
        for side in best
        if side != "forge"
    }
    vs_generate = {}
    if hf is not None:
        ratio = best["generate"]["seconds"] / best["forge"]["seconds"]
        vs_generate = {"ratio": round(ratio, 3), "target": target, "met": ratio >= target}
    return {
        "generated_tokens": generated,
        **{side: rounded(result) for side, result in best.items()},
        "forge_speedup_over": speedups,
        **vs_generate,
        # Outside the forward, per decode step, in CPU time (see ForwardClock), each side's least.
        "other_cpu_ms_per_step": {
            side: round(min(r["other_cpu_ms_per_decode_step"] for r in rounds[side]), 4) for side in rounds
        },
        **(
            {
                "other_per_step_at_most_generate": min(
                    r["other_cpu_ms_per_decode_step"] for r in rounds["forge"]
                )
                <= min(r["other_cpu_ms_per_decode_step"] for r in rounds["generate"])
            }
            if hf is not None
            else {}
        ),
    }


def prompt_of(length: int, salt: int) -> list[int]:
    return [(i * 7 + salt * 13) % (VOCAB - 2) + 1 for i in range(length)]


def samples_of(
    prompt: list[int], completions: list[list[int]], logprobs: list[list[float]] | None
) -> list[Sample]:
    """A group's training samples; advantages +-1 so no sample is skipped."""
    out = []
    for i, completion in enumerate(completions):
        behaviour = logprobs[i] if logprobs is not None else [0.0] * len(completion)
        out.append(
            Sample(
                token_ids=prompt + completion,
                loss_mask=[0] * len(prompt) + [1] * len(completion),
                behaviour_logprobs=[0.0] * len(prompt) + list(behaviour),
                policy_versions=[0] * (len(prompt) + len(completion)),
                advantage=1.0 if i % 2 else -1.0,
                group_id="g",
            )
        )
    return out


def step(
    sample: Callable[[], list[tuple[list[int], list[float] | None]]], trainer: Any, prompt: list[int]
) -> dict[str, float]:
    """One sync step: sample the group's completions, then train on them."""
    with quiet_gc():
        started = time.perf_counter()
        completions = sample()
        rolled = time.perf_counter()
        logprobs = [lp for _, lp in completions]
        trainer.train_step(
            samples_of(prompt, [ids for ids, _ in completions], None if logprobs[0] is None else logprobs)
        )
        done = time.perf_counter()
    return {"seconds": done - started, "rollout_s": rolled - started, "train_s": done - rolled}


def step_cases(path: Path, engine: HFEngine, model: Any, threads: int, repeats: int) -> dict[str, Any]:
    """(d): one sync step each way, on the same prompt and sampling settings."""
    from forge.train.trainer import Trainer

    model_cfg = ModelConfig(path=str(path))
    train_cfg = TrainConfig(learning_rate=1e-5, checkpoint_every=0)
    trainers = {
        packing: Trainer(
            path, model_cfg, train_cfg, TrainerConfig(packing=packing, attn_implementation="sdpa"), 0, threads
        )
        for packing in ("tree", "padded")
    }
    out = {}
    for length in (256, 1024):
        prompt = prompt_of(length, salt=5)
        forge_step = lambda prompt=prompt: step(  # noqa: E731
            lambda: [
                (r.token_ids, r.logprobs)
                for r in engine.generate([GenerationRequest(list(prompt), NEW_TOKENS) for _ in range(8)])
            ],
            trainers["tree"],
            prompt,
        )
        padded_step = lambda prompt=prompt: step(  # noqa: E731
            lambda: [
                (row, None)
                for row in hf_sample(
                    model, torch.tensor([prompt] * 8, device=model.device), NEW_TOKENS
                ).tolist()
            ],
            trainers["padded"],
            prompt,
        )
        forge_step(), padded_step()  # warm-up: the trainers' first step allocates
        best = alternate({"forge": forge_step, "generate_padded": padded_step}, repeats)
        name = f"step_P{length}"
        ratio = best["generate_padded"]["seconds"] / best["forge"]["seconds"]
        out[name] = {
            "forge": rounded(best["forge"]),
            "generate_padded": rounded(best["generate_padded"]),
            "ratio": round(ratio, 3),
            "target": STEP_TARGETS[name],
            "met": ratio >= STEP_TARGETS[name],
        }
    return out


def thread_handoff(engine: HFEngine, repeats: int) -> dict[str, Any]:
    """Case (a) at P=256 run on this thread against inside asyncio.to_thread."""
    run = forge_group(engine, prompt_of(256, salt=9), 8)

    def here() -> dict[str, float]:
        with quiet_gc():
            started = time.perf_counter()
            run()
            return {"seconds": time.perf_counter() - started}

    def handed_off() -> dict[str, float]:
        with quiet_gc():
            started = time.perf_counter()
            asyncio.run(asyncio.to_thread(run))
            return {"seconds": time.perf_counter() - started}

    best = alternate({"calling_thread": here, "to_thread": handed_off}, repeats)
    return {
        "calling_thread_s": round(best["calling_thread"]["seconds"], 4),
        "to_thread_s": round(best["to_thread"]["seconds"], 4),
        "to_thread_over_calling": round(best["to_thread"]["seconds"] / best["calling_thread"]["seconds"], 3),
    }


def batch_cases(
    model: Any,
    engine: HFEngine,
    clock: ForwardClock,
    batches: list[int],
    repeats: int,
    bandwidth_gbs: float | None,
) -> dict[str, Any]:
    """Case (a)'s shape at P=256 for each batch size, against the decode bound of memory
    bandwidth: every decode step reads all the weights once, so tokens/s <= batch x
    bandwidth / weight bytes (the KV cache's reads come on top)."""
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    if bandwidth_gbs is None:
        bandwidth_gbs = next((gbs for key, gbs in BANDWIDTH_GBS.items() if key in name), None)
    out: dict[str, Any] = {"device": name, "weight_bytes": weight_bytes, "bandwidth_gbs": bandwidth_gbs}
    prompt = prompt_of(256, salt=3)
    for batch in batches:
        case = compare(
            clock,
            forge_group(engine, prompt, batch),
            hf_group(model, prompt, batch),
            batch * NEW_TOKENS,
            repeats,
            1.0,
        )
        if bandwidth_gbs:
            bound = batch * bandwidth_gbs * 1e9 / weight_bytes
            case["bandwidth_bound_tokens_per_s"] = round(bound, 1)
            for side in ("forge", "generate"):
                case[side]["fraction_of_bound"] = round(case[side]["tokens_per_s"] / bound, 4)
        if torch.cuda.is_available():
            case["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        out[f"batch_{batch}"] = case
        print(f"batch_{batch}", json.dumps(case), flush=True)
    return out


def main(
    threads: int,
    repeats: int,
    only: list[str] | None,
    output: Path,
    profile_label: str | None,
    preset: str = "small",
    device: str = "cpu",
    dtype: str = "float32",
    batches: list[int] | None = None,
    bandwidth_gbs: float | None = None,
    compare_copy: bool = False,
    no_generate: bool = False,
) -> dict:
    torch.set_num_threads(threads)
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp), preset)
        model_cfg = ModelConfig(path=str(path), dtype=dtype)
        model = load_model(path, model_cfg, device=device, attn_implementation="sdpa").eval()
        clock = ForwardClock(model)
        # A stop token no row can sample; the context bounds every row (a window longer never binds).
        engine = HFEngine(model, [10**9], 0, seed=0, max_context_tokens=CONTEXT)
        # The same engine with the group's prompt KV copied into each row (as before it was shared).
        copying = (
            HFEngine(model, [10**9], 0, seed=0, share_prompt=False, max_context_tokens=CONTEXT)
            if compare_copy
            else None
        )
        # On a windowed model, the copy under position-counted window masks too: the engine that
        # does not know its context, so cannot tell that the window never binds.
        windowed = "sliding_window" in MODELS[preset]
        counted = HFEngine(model, [10**9], 0, seed=0) if compare_copy and windowed else None
        torch.manual_seed(0)  # generate samples from torch's global generator
        if batches:
            with torch.no_grad():
                forge_group(engine, prompt_of(64, 0), 2)(), hf_group(model, prompt_of(64, 0), 2)()  # warm-up
                report = {
                    "model": f"{preset} ({MODELS[preset]}), {dtype}, sdpa, random init",
                    "repeats": repeats,
                    "new_tokens": NEW_TOKENS,
                    "prompt_tokens": 256,
                    **batch_cases(model, engine, clock, batches, repeats, bandwidth_gbs),
                }
            save_result(report, output)
            print(json.dumps(report))
            return report
        cases: dict[str, tuple[Callable[[], int], Callable[[], int], int]] = {}
        for length in (256, 1024, 4096):
            prompt = prompt_of(length, salt=length)
            cases[f"a_P{length}"] = (
                forge_group(engine, prompt, 8),
                None if no_generate else hf_group(model, prompt, 8),
                8 * NEW_TOKENS,
            )
        prompt = prompt_of(256, salt=1)
        cases["b_P256_16"] = (
            forge_group(engine, prompt, 16),
            None if no_generate else hf_group(model, prompt, 16),
            16 * NEW_TOKENS,
        )
        prompt = prompt_of(EPISODE_PROMPT, salt=2)
        cases["c_multiturn"] = (
            forge_episodes(engine, prompt, 8),
            None if no_generate else hf_episodes(model, prompt, 8),
            8 * TURNS * TURN_TOKENS,
        )
        report: dict[str, Any] = {
            "model": f"{'mistral' if windowed else 'qwen2'} {preset} ({MODELS[preset]}), {dtype}, sdpa, random init",
            "max_context_tokens": CONTEXT,
            "torch_threads": threads,
            "cpus": os.cpu_count(),
            "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
            "repeats": repeats,
            "timing": "one process; Forge and generate alternate within each round, each keeps its fastest "
            "round (the machine is shared with other processes); a warm-up round first",
            "cases": {},
        }
        with torch.no_grad():
            forge_group(engine, prompt_of(64, 0), 2)(), hf_group(model, prompt_of(64, 0), 2)()  # warm-up
        report["shares_prompt"] = engine.share_prompt
        for name, (forge, hf, generated) in cases.items():
            if only and name not in only:
                continue
            others = {}
            if copying is not None and name.startswith(("a_", "b_")):
                length, samples = (256, 16) if name.startswith("b_") else (int(name[3:]), 8)
                others["forge_copied_prompt"] = forge_group(
                    copying, prompt_of(length, salt=1 if samples == 16 else length), samples
                )
                if counted is not None:
                    others["forge_copied_windows_counted"] = forge_group(
                        counted, prompt_of(length, salt=1 if samples == 16 else length), samples
                    )
            with torch.no_grad():
                report["cases"][name] = compare(clock, forge, hf, generated, repeats, TARGETS[name], others)
            print(name, json.dumps(report["cases"][name]), flush=True)
        if not only or "handoff" in only:
            report["thread_handoff"] = thread_handoff(engine, repeats)
        if not only or "step" in only:
            report["steps"] = step_cases(path, engine, model, threads, repeats)
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    report["all_targets_met"] = all(c.get("met", True) for c in report["cases"].values()) and all(
        c["met"] for c in report.get("steps", {}).values()
    )
    if profile_label:
        profile_path = output.parent / "generation-profile.json"
        profile = json.loads(profile_path.read_text()) if profile_path.is_file() else {}
        profile[profile_label] = {
            "torch_threads": threads,
            "cases": {
                name: {
                    side: {
                        k: case[side][k]
                        for k in (
                            "decode_steps",
                            "seconds",
                            "decode_forward_ms_per_step",
                            "other_ms_per_decode_step",
                            "decode_forward_cpu_ms_per_step",
                            "other_cpu_ms_per_decode_step",
                        )
                    }
                    | {"least_other_cpu_ms_per_decode_step": case["other_cpu_ms_per_step"][side]}
                    for side in case["other_cpu_ms_per_step"]
                }
                for name, case in report["cases"].items()
            },
        }
        save_result(profile, profile_path)
    save_result(report, output)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads (both sides)")
    parser.add_argument("--repeats", type=int, default=3, help="alternated rounds per case")
    parser.add_argument("--only", nargs="*", help="case names (a_P256 ... c_multiturn, handoff, step)")
    parser.add_argument("--output", type=Path, default=RESULTS / "generation.json")
    parser.add_argument("--profile-label", help="also file the per-step split under this label")
    parser.add_argument("--model", choices=sorted(MODELS), default="small")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument(
        "--batches",
        type=int,
        nargs="*",
        help="instead of cases a-d: a group of this many samples at P=256, per size, "
        "against the memory-bandwidth bound (the GPU run)",
    )
    parser.add_argument(
        "--bandwidth-gbs", type=float, help="the device's memory bandwidth (else looked up by name)"
    )
    parser.add_argument(
        "--compare-copy",
        action="store_true",
        help="cases a and b also run Forge with the group's prompt KV copied into every row "
        "(HFEngine share_prompt=False; on a windowed model also without a context, so under "
        "position-counted window masks), alternated in the same rounds",
    )
    parser.add_argument(
        "--no-generate",
        action="store_true",
        help="leave transformers' generate out of cases a-c (Forge's sides alone, with --compare-copy)",
    )
    args = parser.parse_args()
    main(
        args.threads,
        args.repeats,
        args.only,
        args.output,
        args.profile_label,
        args.model,
        args.device,
        args.dtype,
        args.batches,
        args.bandwidth_gbs,
        args.compare_copy,
        args.no_generate,
    )
