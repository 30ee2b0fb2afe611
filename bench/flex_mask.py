"""Benchmark: building a tree micro-batch's flex-attention BlockMask, Forge's block layout
(forge.tree.masks.flex_tree_block_mask: O(blocks^2) from the tree's structure) against flex's
`create_block_mask` over the same rule (evaluates all N^2 pairs), alternated in one process.
A micro-batch's mask is built once per forward (per window), so this is per micro-batch host
time of the flex tree path.

Prints one JSON object and writes bench/results/flex-mask.json (flex-mask-gpu.json on CUDA).
Run: python -m bench.flex_mask [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import torch

from forge.tree import build_prefix_tree
from forge.tree.masks import flex_tree_block_mask


def create_block_mask_reference(subtree_end: torch.Tensor, block_size: int = 128):
    """The previous builder: flex's create_block_mask evaluating the rule everywhere."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(batch, head, query, key):
        return (key <= query) & (query < subtree_end[key])

    n = subtree_end.shape[0]
    return create_block_mask(mask_mod, None, None, n, n, device=subtree_end.device, BLOCK_SIZE=block_size)


def agent_tree(nodes: int, seed: int = 0) -> list[list[int]]:
    """Agent-style samples: a shared system prompt, episodes whose calls extend each other."""
    rng = random.Random(seed)
    system = [rng.randrange(1000) for _ in range(600)]
    samples, total = [], 600
    while total < nodes:
        episode = list(system)
        for _ in range(4):
            episode = episode + [rng.randrange(1000) for _ in range(rng.randint(40, 160))]
            samples.append(list(episode))
        total = build_prefix_tree(samples).num_nodes
    return samples


def timed(build, subtree_end: torch.Tensor, device: str) -> float:
    started = time.perf_counter()
    mask = build(subtree_end)
    if device == "cuda":
        torch.cuda.synchronize()
    del mask
    return time.perf_counter() - started


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()
    results = {}
    for nodes in (1024, 3300, 8192):
        tree = build_prefix_tree(agent_tree(nodes))
        ends = torch.as_tensor(tree.subtree_end, device=args.device)
        new = flex_tree_block_mask(ends)
        old = create_block_mask_reference(ends)
        same = torch.equal(new.to_dense(), old.to_dense())
        times: dict[str, list[float]] = {"block_layout": [], "create_block_mask": []}
        for _ in range(args.repeats):  # alternated, after the warm-up build above
            times["block_layout"].append(timed(flex_tree_block_mask, ends, args.device))
            times["create_block_mask"].append(timed(create_block_mask_reference, ends, args.device))
        medians = {name: statistics.median(values) for name, values in times.items()}
        results[str(tree.num_nodes)] = {
            "ms_block_layout": round(1000 * medians["block_layout"], 3),
            "ms_create_block_mask": round(1000 * medians["create_block_mask"], 3),
            "speedup": round(medians["create_block_mask"] / medians["block_layout"], 1),
            "same_blocks": same,
        }
    device = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {
        "benchmark": "flex_mask",
        "device": f"{device}; torch {torch.__version__}",
        "what": "median wall ms to build one micro-batch's BlockMask (block size 128), alternated",
        "nodes": results,
    }
    output = args.output or Path("bench/results") / (
        "flex-mask-gpu.json" if args.device == "cuda" else "flex-mask.json"
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
