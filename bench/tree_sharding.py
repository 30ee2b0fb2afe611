"""How much of the prefix tree's sharing survives data parallelism, by how the batch is split.

`train.num_trainers: N` splits each batch over N processes, and each packs its share into
its own prefix trees, so a prompt whose samples land on k processes is computed k times.
For the `bench.tree` workloads and N = 2, 4, 8, this compares two splits:

- `dealt`: every N-th sample to a process (how forge split batches before);
- `prefix`: `forge.train.distributed.shard_indices`, the batch in prefix-tree order cut into
  N runs of near-equal tree size, so samples that share a prefix stay together.

Per split: `tree_token_ratio` (the batch's tokens over the tokens all processes compute,
packed as the trainer packs them, `trainer.max_tokens_per_microbatch` 4096) and
`max_process_tokens` (what the slowest process computes: a data-parallel step waits for
it). `prefix_speedup` = dealt's max_process_tokens / prefix's.

With `--timed`, it also trains: 2 gloo processes (`DistributedTrainer`, one CPU thread
each, `bench.tree`'s model) take steps on `grpo` and `agent_per_call` under each split,
alternating `--repeats` times; `step_seconds` is the median step, and `timed_speedup`
dealt's over prefix's. Prints one JSON object and writes bench/results/tree_sharding.json.

    python -m bench.tree_sharding            # token counts only: a few seconds
    python -m bench.tree_sharding --timed    # and 2-process steps (~4 minutes)
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from bench.report import save_result
from bench.tree import BUDGET, WORKLOADS
from forge.models.tiny import build_tokenizer
from forge.train.distributed import shard_indices
from forge.tree import microbatches
from forge.types import Sample

RESULTS = Path(__file__).parent / "results" / "tree_sharding.json"
WORLD_SIZES = (2, 4, 8)
SPLITS = ("dealt", "prefix")
TIMED_WORKLOADS = ("grpo", "agent_per_call")


def dealt(samples: list[Sample], rank: int, world_size: int, min_samples: int = 1) -> list[Sample]:
    """How forge split batches before: every world_size-th sample."""
    return samples[rank::world_size]


def child(split: str, workload: str, model_dir: str, steps: int, out: str) -> None:
    """One rank: train `steps` steps (after a warm-up) with the batch split by `split`."""
    import torch.distributed as dist

    from bench.ranks import timed_steps
    from forge.config import ModelConfig, TrainConfig, TrainerConfig
    from forge.train import distributed

    if split == "dealt":
        distributed.shard = dealt
    trainer = distributed.DistributedTrainer(
        model_dir,
        ModelConfig(path=model_dir),
        TrainConfig(),
        TrainerConfig(packing="tree", max_tokens_per_microbatch=BUDGET, attn_implementation="sdpa"),
        seed=0,
        num_threads=1,
    )
    samples = WORKLOADS[workload](len(build_tokenizer()), random.Random(workload))
    seconds = timed_steps(trainer, samples, steps)
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(seconds))
    trainer.close()


def timed(repeats: int, steps: int) -> dict:
    import statistics
    import tempfile

    from bench.ranks import run_ranks
    from bench.tree import MODEL
    from forge.models.tiny import save_tiny_checkpoint

    runs: dict = {w: {s: [] for s in SPLITS} for w in TIMED_WORKLOADS}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_tiny_checkpoint(MODEL, Path(tmp) / "model", seed=0)
        for _ in range(repeats):
            for workload in TIMED_WORKLOADS:
                for split in SPLITS:
                    out = Path(tmp) / f"{workload}-{split}.json"
                    run_ranks(
                        "bench.tree_sharding", [split, workload, str(model_dir), str(steps), str(out)], 2
                    )
                    runs[workload][split].append(statistics.median(json.loads(out.read_text())))
    result = {}
    for workload, by_split in runs.items():
        medians = {split: statistics.median(values) for split, values in by_split.items()}
        result[workload] = {
            "step_seconds": {split: round(value, 3) for split, value in medians.items()},
            "timed_speedup": round(medians["dealt"] / medians["prefix"], 3),
            "runs": {split: [round(v, 3) for v in values] for split, values in by_split.items()},
        }
    return result


def computed_tokens(samples: list[Sample]) -> int:
    if not samples:
        return 0
    return sum(b.tokens_computed for b in microbatches(samples, "tree", BUDGET, "dense"))


def measure(samples: list[Sample], shards: list[list[int]], seconds: float) -> dict:
    per_process = [computed_tokens([samples[i] for i in s]) for s in shards]
    return {
        "tree_token_ratio": round(sum(len(s.token_ids) for s in samples) / sum(per_process), 3),
        "max_process_tokens": max(per_process),
        "process_samples": [len(s) for s in shards],
        "split_ms": round(1000 * seconds, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--timed", action="store_true", help="also time 2-process training steps")
    parser.add_argument("--repeats", type=int, default=3, help="--timed: runs per split, alternating")
    parser.add_argument("--steps", type=int, default=3, help="--timed: timed steps per run")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        split, workload, model_dir, steps, out = args.child
        child(split, workload, model_dir, int(steps), out)
        return
    vocab = len(build_tokenizer())
    result: dict = {"budget": BUDGET, "workloads": {}}
    for name, make in WORKLOADS.items():
        samples = make(vocab, random.Random(name))
        token_ids = [s.token_ids for s in samples]
        separate = sum(map(len, token_ids))
        row: dict = {
            "samples": len(samples),
            "tokens_separate": separate,
            "tree_token_ratio_one_process": round(separate / computed_tokens(samples), 3),
        }
        for world_size in WORLD_SIZES:
            started = time.perf_counter()
            dealt = [list(range(len(token_ids)))[rank::world_size] for rank in range(world_size)]
            dealt_seconds = time.perf_counter() - started
            started = time.perf_counter()
            prefix = shard_indices(token_ids, world_size)
            prefix_seconds = time.perf_counter() - started
            entry = {
                "dealt": measure(samples, dealt, dealt_seconds),
                "prefix": measure(samples, prefix, prefix_seconds),
            }
            entry["prefix_speedup"] = round(
                entry["dealt"]["max_process_tokens"] / entry["prefix"]["max_process_tokens"], 3
            )
            row[f"processes_{world_size}"] = entry
        result["workloads"][name] = row
    if args.timed:
        result["timed_two_processes"] = timed(args.repeats, args.steps)
    print(json.dumps(result, indent=2))
    save_result(result, args.output)


if __name__ == "__main__":
    main()
