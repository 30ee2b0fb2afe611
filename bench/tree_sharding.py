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
it). `prefix_speedup` = dealt's max_process_tokens / prefix's. Token counts, not timings:
the step time of a process follows the tokens it computes (see `bench.tree`). Prints one
JSON object and writes bench/results/tree_sharding.json.

    python -m bench.tree_sharding        # a few seconds
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from bench.tree import BUDGET, WORKLOADS
from forge.models.tiny import build_tokenizer
from forge.train.distributed import shard_indices
from forge.tree import microbatches
from forge.types import Sample

RESULTS = Path(__file__).parent / "results" / "tree_sharding.json"
WORLD_SIZES = (2, 4, 8)


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
    args = parser.parse_args()
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
            entry = {"dealt": measure(samples, dealt, dealt_seconds),
                     "prefix": measure(samples, prefix, prefix_seconds)}
            entry["prefix_speedup"] = round(
                entry["dealt"]["max_process_tokens"] / entry["prefix"]["max_process_tokens"], 3
            )
            row[f"processes_{world_size}"] = entry
        result["workloads"][name] = row
    text = json.dumps(result, indent=2)
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
