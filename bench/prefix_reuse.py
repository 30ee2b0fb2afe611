"""What the engine's cache saves when calls do not extend an episode's own cached tokens.

Workloads of an agent run, on bench.generation's CPU model (Qwen2, 4 layers, hidden 256,
fp32, sdpa, 1 thread); every task's prompt is a 1024-token system prompt, then 64 of its own:

  (a) `arrivals`: 4 tasks x 4 episodes. Each episode's first turn arrives alone, as an agent
      process over the gateway starts (the group's prompt is not in one call), then all 16
      play 3 more turns together: 32 new tokens, a 32-token observation.
  (b) `re-rendered`: the 16 episodes, their first turns in one call, then 4 turns in which
      the client sends each reply back without its last 4 sampled tokens (a stop string cut
      there, or a framework that re-rendered the text), then its observation.
  (c) `one-call`: 8 tasks' first turns in one call, no episode cached (a sync run's step).
  (d) `start-N`: 4 tasks in one call under a common start of N tokens, 8 new tokens each:
      running the start once apart (`apart`, from 16 tokens on) against in each row, to place
      SHARED_START_MIN_TOKENS where one forward more starts to pay.
  (e) `ended`: the 16 episodes one after another, 3 turns each, on an engine as `forge serve`
      runs it (ServedEngine, 65536 cached tokens), each released when it ends: an agent loop
      that plays one episode at a time. `reuse` keeps an ended episode's KV for later ones to
      start from (`HFEngine.retire`); `release-drops` drops it at once, as before.

`reuse` is the engine as it is: a new episode starts from the longest prefix (at least
BORROW_MIN_TOKENS) another episode's cache holds, a turn that parts from its own cache keeps
the part before, and new rows of one call that start alike (at least SHARED_START_MIN_TOKENS)
run that start once. `exact-only` is the engine as it was: an episode's cache is used only
when the call extends all of it, and every row runs its own start. The two take turns in each
round and keep their fastest. Prints one JSON object and writes bench/results/prefix-reuse.json.

    python -m bench.prefix_reuse [--repeats 5]
    python -m bench.prefix_reuse --model qwen2-0.5b --device cuda --dtype bfloat16  # bench/gpu_prefix_reuse.sh
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from bench.generation import (
    ForwardClock,
    alternate,
    prompt_of,
    rounded,
    save_checkpoint,
    timed,
)
from bench.report import save_result
from forge.config import ModelConfig
from forge.models.loading import load_model, quiet_transformers
from forge.rollout.engines import episode_kv
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest
from forge.rollout.engines.served import ServedEngine

SYSTEM, TASK, TASKS, GROUP = 1024, 64, 4, 4
NEW, OBSERVATION, CUT = 32, 32, 4
STARTS = (16, 32, 64, 128, 256)


class StartsApart(HFEngine):
    """The engine with new rows' common starts run apart from `start_min` tokens on, and
    other episodes' prefixes borrowed from `borrow_min` on."""

    start_min = 16
    borrow_min = episode_kv.BORROW_MIN_TOKENS

    def generate(self, requests: list[GenerationRequest]) -> list:
        kept = episode_kv.SHARED_START_MIN_TOKENS, episode_kv.BORROW_MIN_TOKENS
        episode_kv.SHARED_START_MIN_TOKENS, episode_kv.BORROW_MIN_TOKENS = self.start_min, self.borrow_min
        try:
            return super().generate(requests)
        finally:
            episode_kv.SHARED_START_MIN_TOKENS, episode_kv.BORROW_MIN_TOKENS = kept


class ExactOnly(StartsApart):
    """The engine before partial reuse: an episode's cache only when the call extends it all,
    never another episode's, and new rows that start alike each run their start in their row."""

    start_min = borrow_min = 10**9

    def _past_for(self, request: GenerationRequest) -> Any:
        past = self._episodes.pop(request.episode_id, None) if request.episode_id else None
        return past if past is not None and episode_kv.kept_part(past, request.token_ids) is past else None


class DropsEnded(ServedEngine):
    """The served engine before ended episodes' KV was kept: a release drops it at once."""

    def release(self, episode_id: str) -> None:
        with self._state:
            self._live.pop(episode_id, None)
        self.engine.release(episode_id)


def observation(episode: int, turn: int) -> list[int]:
    return [(episode * 5 + turn * 3 + i) % 500 + 1 for i in range(OBSERVATION)]


def prompts() -> dict[str, list[int]]:
    system = prompt_of(SYSTEM, 0)
    return {f"t{t}/e{e}": system + prompt_of(TASK, t + 1) for t in range(TASKS) for e in range(GROUP)}


def play(engine: HFEngine, contexts: dict[str, list[int]], turns: int, cut: int) -> int:
    """`turns` turns of every episode in one call each; returns the tokens prefilled."""
    prefilled = 0
    for turn in range(turns):
        requests = [GenerationRequest(ids, NEW, episode_id=name) for name, ids in contexts.items()]
        for index, (request, result) in enumerate(zip(requests, engine.generate(requests), strict=True)):
            prefilled += result.prefill_tokens
            reply = result.token_ids[: len(result.token_ids) - cut]
            contexts[request.episode_id] = request.token_ids + reply + observation(index, turn)
    return prefilled


def arrivals(engine: HFEngine) -> int:
    contexts = prompts()
    prefilled = 0
    for index, (name, ids) in enumerate(list(contexts.items())):
        result = engine.generate([GenerationRequest(ids, NEW, episode_id=name)])[0]
        prefilled += result.prefill_tokens
        contexts[name] = ids + result.token_ids + observation(index, 0)
    prefilled += play(engine, contexts, 3, cut=0)
    for name in contexts:
        engine.release(name)
    return prefilled


def one_call(engine: HFEngine, start: int, tasks: int) -> int:
    """`tasks` new episodes in one call, under a common start of `start` tokens."""
    system = prompt_of(start, 0)
    requests = [
        GenerationRequest(system + prompt_of(TASK, t + 1), 8, episode_id=f"s{t}") for t in range(tasks)
    ]
    prefilled = sum(result.prefill_tokens for result in engine.generate(requests))
    for request in requests:
        engine.release(request.episode_id)
    return prefilled


def re_rendered(engine: HFEngine) -> int:
    contexts = prompts()
    prefilled = play(engine, contexts, 5, cut=CUT)
    for name in contexts:
        engine.release(name)
    return prefilled


def one_at_a_time(served: ServedEngine) -> int:
    prefilled = 0
    for index, (name, ids) in enumerate(prompts().items()):
        for turn in range(3):
            result = served.generate([GenerationRequest(ids, NEW, episode_id=name)])[0]
            prefilled += result.prefill_tokens
            ids = ids + result.token_ids + observation(index, turn)
        served.release(name)
    served.load_weights({}, 0)  # the next round starts with nothing cached
    return prefilled


def main(
    repeats: int,
    output: Path,
    preset: str = "small",
    device: str = "cpu",
    dtype: str = "float32",
    only: list[str] | None = None,
) -> dict:
    torch.set_num_threads(1)
    quiet_transformers()
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp), preset)
        model_cfg = ModelConfig(path=str(path), dtype=dtype)
        model = load_model(path, model_cfg, device=device, attn_implementation="sdpa").eval()
    clock = ForwardClock(model)
    engines = {
        "reuse": HFEngine(model, [10**9], 0, seed=0, max_context_tokens=8192),
        "exact-only": ExactOnly(model, [10**9], 0, seed=0, max_context_tokens=8192),
    }
    name = torch.cuda.get_device_name() if model.device.type == "cuda" else "cpu, 1 thread"
    report: dict[str, Any] = {
        "model": f"bench.generation {preset} ({dtype}, sdpa)",
        "device": name,
        "episodes": TASKS * GROUP,
        "system_prompt_tokens": SYSTEM,
        "repeats": repeats,
    }
    cases = [
        ("arrivals", arrivals, engines),
        ("re-rendered", re_rendered, engines),
        ("one-call", lambda engine: one_call(engine, SYSTEM, 2 * TASKS), engines),
    ]
    # Where running a common start apart starts to pay: 4 tasks in one call, each start length.
    apart = {"apart": StartsApart(model, [10**9], 0, seed=0), "exact-only": engines["exact-only"]}
    cases += [(f"start-{n}", lambda engine, n=n: one_call(engine, n, TASKS), apart) for n in STARTS]
    served = {"reuse": ServedEngine(engines["reuse"]), "release-drops": DropsEnded(engines["reuse"])}
    cases.append(("ended", one_at_a_time, served))
    for case, workload, arms in cases:
        if only and not any(case.startswith(wanted) for wanted in only):
            continue
        for engine in arms.values():
            workload(engine)  # warm-up
        runs = {
            name: (lambda engine=engine, workload=workload: timed(clock, lambda: workload(engine)))
            for name, engine in arms.items()
        }
        best = {name: rounded(result) for name, result in alternate(runs, repeats).items()}
        new, old = (best[name] for name in arms)
        report[case] = {
            **best,
            "prefill_tokens_ratio": round(new["prefill_tokens"] / old["prefill_tokens"], 3),
            "seconds_ratio": round(new["seconds"] / old["seconds"], 3),
        }
    save_result(report, output)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="small", help="a bench.generation preset (small, qwen2-0.5b, ...)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--cases", nargs="*", help="run only the cases whose names start so (e.g. start- one-call)"
    )
    parser.add_argument(
        "--output", type=Path, default=Path(__file__).parent / "results" / "prefix-reuse.json"
    )
    args = parser.parse_args()
    main(args.repeats, args.output, args.model, args.device, args.dtype, args.cases)
