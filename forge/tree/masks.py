"""Attention masks for a DFS-laid-out prefix tree, both from one rule:
query q sees key k iff k <= q < subtree_end[k] (k is q or an ancestor of q)."""

from __future__ import annotations

import torch


def dense_tree_mask(subtree_end: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive `(1, 1, N, N)` mask: 0 where allowed, the dtype's minimum elsewhere.

    Float, not boolean: transformers' eager attention adds a 4-D mask to the scores.
    """
    n = subtree_end.shape[0]
    positions = torch.arange(n, device=subtree_end.device)
    query, key = positions[:, None], positions[None, :]
    allowed = (key <= query) & (query < subtree_end[None, :])
    mask = torch.zeros((n, n), dtype=dtype, device=subtree_end.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None]


def flex_tree_block_mask(subtree_end: torch.Tensor, block_size: int = 128):
    """flex-attention `BlockMask` of the same rule; fully masked blocks are skipped."""
    from torch.nn.attention.flex_attention import create_block_mask

    def tree_rule(batch, head, query, key):
        return (key <= query) & (query < subtree_end[key])

    n = subtree_end.shape[0]
    return create_block_mask(
        tree_rule, B=None, H=None, Q_LEN=n, KV_LEN=n, device=subtree_end.device, BLOCK_SIZE=block_size
    )
