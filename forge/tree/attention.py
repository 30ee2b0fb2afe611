"""Block-sparse tree attention through SDPA, for models without flex attention's backward (CPU).

A dense `(N, N)` tree mask makes SDPA compute every query against every key, most of them
masked: a micro-batch of unrelated branches costs N^2. In DFS order the keys that a block of
queries `[a, b)` can see are exactly the ancestors of node a plus the block itself (an
ancestor of a later node in the block that lies before a is an ancestor of a), so each
block attends to those keys only: about the work of running each path on its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

TREE_BLOCKS_KWARG = "forge_tree_blocks"  # model(...) keyword that reaches the attention function
QUERY_BLOCK = 256


@dataclass
class QueryBlock:
    """Queries `[start, end)` attend to nodes `keys` under the additive `mask` `(1, 1, end-start, len(keys))`."""

    start: int
    end: int
    keys: torch.Tensor
    mask: torch.Tensor


def tree_query_blocks(
    subtree_end: np.ndarray, dtype: torch.dtype, device: torch.device, block_size: int | None = None
) -> list[QueryBlock]:
    """Split the nodes into query blocks, each with the only keys its queries may see."""
    block_size = block_size or QUERY_BLOCK
    n = len(subtree_end)
    ends = torch.as_tensor(subtree_end, device=device)
    blocks = []
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        ancestors = np.flatnonzero(subtree_end[:start] > start)
        keys = torch.as_tensor(np.concatenate([ancestors, np.arange(start, end)]), device=device)
        query = torch.arange(start, end, device=device)[:, None]
        allowed = (keys[None, :] <= query) & (query < ends[keys][None, :])
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        blocks.append(QueryBlock(start, end, keys, mask[None, None]))
    return blocks


def _tree_sdpa_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers' sdpa attention, except when a tree forward passes its query blocks."""
    blocks: list[QueryBlock] | None = kwargs.pop(TREE_BLOCKS_KWARG, None)
    if blocks is None:
        return _transformers_sdpa(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if kwargs.get("sliding_window"):
        raise ValueError(
            "tree packing does not support sliding-window attention layers; set trainer.packing: padded"
        )
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    outputs = [
        torch.nn.functional.scaled_dot_product_attention(
            query[:, :, b.start : b.end],
            key.index_select(2, b.keys),
            value.index_select(2, b.keys),
            attn_mask=b.mask,
            dropout_p=dropout,
            scale=scaling,
        )
        for b in blocks
    ]
    return torch.cat(outputs, dim=2).transpose(1, 2).contiguous(), None


_transformers_sdpa = None


def enable_tree_sdpa() -> None:
    """Route transformers' "sdpa" attention through `_tree_sdpa_forward` (idempotent).

    Calls without the tree keyword behave exactly as before: they go to transformers' own sdpa.
    """
    global _transformers_sdpa
    if _transformers_sdpa is not None:
        return
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    _transformers_sdpa = sdpa_attention_forward
    AttentionInterface.register("sdpa", _tree_sdpa_forward)
