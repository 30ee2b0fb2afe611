"""Attention masks for a DFS-laid-out prefix tree, all from one rule: query q sees key k iff
k <= q < subtree_end[k] (k is q or an ancestor of q), and, on a sliding-window layer of
window W, depth[q] - depth[k] < W (exact, since a node's position is its depth)."""

from __future__ import annotations

import torch


def tree_rule(
    query: torch.Tensor,
    key: torch.Tensor,
    subtree_end: torch.Tensor,
    depth: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Whether node `query` may attend to node `key` (broadcasting index tensors)."""
    allowed = (key <= query) & (query < subtree_end[key])
    if window is not None:
        if depth is None:
            raise ValueError("a sliding-window tree mask needs the nodes' depths")
        allowed = allowed & (depth[query] - depth[key] < window)
    return allowed


def dense_tree_mask(
    subtree_end: torch.Tensor,
    dtype: torch.dtype,
    depth: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """Additive `(1, 1, N, N)` mask: 0 where allowed, the dtype's minimum elsewhere.

    Float, not boolean: transformers' eager attention adds a 4-D mask to the scores.
    """
    positions = torch.arange(subtree_end.shape[0], device=subtree_end.device)
    allowed = tree_rule(positions[:, None], positions[None, :], subtree_end, depth, window)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=subtree_end.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def flex_tree_block_mask(
    subtree_end: torch.Tensor,
    block_size: int = 128,
    depth: torch.Tensor | None = None,
    window: int | None = None,
):
    """flex-attention `BlockMask` of the same rule; fully masked blocks are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    if window is not None and depth is None:
        raise ValueError("a sliding-window tree mask needs the nodes' depths")

    def mask_mod(batch, head, query, key):
        allowed = (key <= query) & (query < subtree_end[key])
        if window is not None:
            allowed = allowed & (depth[query] - depth[key] < window)
        return allowed

    n = subtree_end.shape[0]
    return create_block_mask(
        mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=subtree_end.device, BLOCK_SIZE=block_size
    )
