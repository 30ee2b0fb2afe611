"""Attention masks for a DFS-laid-out prefix tree, all from one rule: query q sees key k iff
k <= q < subtree_end[k] (k is q or an ancestor of q), and, on a sliding-window layer of
window W, depth[q] - depth[k] < W; on a chunked-attention layer of chunk C (Llama 4),
depth[q] // C == depth[k] // C (both exact, since a node's position is its depth)."""

from __future__ import annotations

import numpy as np
import torch


def tree_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    subtree_end: torch.Tensor,
    depth: torch.Tensor | None = None,
    window: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Whether node `query` may attend to node `key` (broadcasting index tensors)."""
    allowed = (key <= query) & (query < subtree_end[key])
    if (window is not None or chunk is not None) and depth is None:
        raise ValueError("a sliding-window or chunked tree mask needs the nodes' depths")
    if window is not None:
        allowed = allowed & (depth[query] - depth[key] < window)
    if chunk is not None:
        allowed = allowed & (depth[query] // chunk == depth[key] // chunk)
    return allowed


def dense_tree_mask(
    subtree_end: torch.Tensor,
    dtype: torch.dtype,
    depth: torch.Tensor | None = None,
    window: int | None = None,
    chunk: int | None = None,
) -> torch.Tensor:
    """Additive `(1, 1, N, N)` mask: 0 where allowed, the dtype's minimum elsewhere.

    Float, not boolean: transformers' eager attention adds a 4-D mask to the scores.
    """
    positions = torch.arange(subtree_end.shape[0], device=subtree_end.device)
    allowed = tree_rule(positions[:, None], positions[None, :], subtree_end, depth, window, chunk)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=subtree_end.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def flex_tree_block_mask(
    subtree_end: torch.Tensor | np.ndarray,
    block_size: int = 128,
    depth: torch.Tensor | np.ndarray | None = None,
    window: int | None = None,
    device: torch.device | str | None = None,
    chunk: int | None = None,
):
    """flex-attention `BlockMask` of the same rule; fully masked blocks are skipped.

    Built from the tree's block structure (`tree_block_layout`, on the host in O(blocks^2)):
    flex's `create_block_mask` would evaluate the rule on all N^2 pairs, on every micro-batch.
    Give numpy arrays (and `device`) to build it without a device-to-host copy."""
    from torch.nn.attention.flex_attention import BlockMask

    if (window is not None or chunk is not None) and depth is None:
        raise ValueError("a sliding-window or chunked tree mask needs the nodes' depths")
    if isinstance(subtree_end, torch.Tensor):
        device = subtree_end.device if device is None else device
    host_ends = _host(subtree_end)
    host_depth = None if depth is None else _host(depth)
    ends = torch.as_tensor(host_ends, device=device)
    depths = None if host_depth is None else torch.as_tensor(host_depth, device=device)

    def mask_mod(batch, head, query, key):
        allowed = (key <= query) & (query < ends[key])
        if window is not None:
            allowed = allowed & (depths[query] - depths[key] < window)
        if chunk is not None:
            allowed = allowed & (depths[query] // chunk == depths[key] // chunk)
        return allowed

    n = len(host_ends)
    partial, full = tree_block_layout(host_ends, block_size, host_depth, window)
    if chunk is not None:  # no block is taken as wholly allowed: the rule decides every pair
        partial, full = partial | full, np.zeros_like(full)

    def as_indices(blocks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        counts = blocks.sum(axis=-1).astype(np.int32)
        # Each row's blocks first (in key order), the rest after: flex reads the first `counts`.
        indices = np.argsort(~blocks, axis=-1, kind="stable").astype(np.int32)
        return (
            torch.as_tensor(counts[None, None], device=device),
            torch.as_tensor(indices[None, None], device=device),
        )

    kv_num_blocks, kv_indices = as_indices(partial)
    full_num_blocks, full_indices = as_indices(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_num_blocks,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=mask_mod,
        seq_lengths=(n, n),
    )


def _host(values: torch.Tensor | np.ndarray) -> np.ndarray:
    return values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)


def tree_block_layout(
    subtree_end: np.ndarray,
    block_size: int,
    depth: np.ndarray | None = None,
    window: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """For query block i and key block j, `(blocks, blocks)` booleans: `partial[i, j]` where the
    rule must be evaluated (some pair may be allowed), `full[i, j]` where every pair is allowed.

    In DFS order a key block j < i holds an ancestor of some query of block i iff one of its
    keys' subtrees reaches past the block's first query, and holds ancestors of every query iff
    all its keys' subtrees reach past the block's last one; a diagonal block is causal, never
    full. Under a window, a pair of blocks whose depths are a window apart or more is skipped,
    and a block is full only if all its depths are within the window."""
    subtree_end = _host(subtree_end)
    n = len(subtree_end)
    blocks = -(-n // block_size)
    pad = blocks * block_size - n
    # The last block's missing keys neither reach anything (max) nor stop short (min).
    reach_max = np.pad(subtree_end, (0, pad), constant_values=0).reshape(blocks, block_size).max(axis=1)
    reach_min = np.pad(subtree_end, (0, pad), constant_values=n + 1).reshape(blocks, block_size).min(axis=1)
    first = np.arange(blocks) * block_size
    last = np.minimum(first + block_size, n) - 1
    below = np.tri(blocks, k=-1, dtype=bool)
    any_allowed = (below & (reach_max[None, :] > first[:, None])) | np.eye(blocks, dtype=bool)
    all_allowed = below & (reach_min[None, :] > last[:, None])
    if window is not None:
        depth = _host(depth)
        # The last block's missing nodes repeat its last depth: no new minimum or maximum.
        depths = np.pad(depth, (0, pad), mode="edge").reshape(blocks, block_size)
        low, high = depths.min(axis=1), depths.max(axis=1)
        any_allowed &= (low[:, None] - high[None, :]) < window  # the closest pair is within it
        all_allowed &= (high[:, None] - low[None, :]) < window  # the farthest pair is within it
    if pad:  # the last block's missing rows and columns are not "allowed": evaluate it
        all_allowed[-1, :] = False
        all_allowed[:, -1] = False
    return any_allowed & ~all_allowed, all_allowed
