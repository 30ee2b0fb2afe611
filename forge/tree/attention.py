"""Forge's tree attention, registered with transformers under its own names.

A model whose `config._attn_implementation` is one of `TREE_IMPLEMENTATIONS`' values runs its
base implementation (sdpa, eager, flex_attention) unchanged, except in a forward that passes
a `TreeLayout` under `TREE_KWARG`: then each layer attends by the tree rule, composed with the
layer's own sliding window and logit soft-cap, which transformers hands every attention call
(`sliding_window=`, `softcap=`). Nothing of transformers' own is replaced.

Three ways to lay the rule out (`TreeLayout.kind`): `flex`, a flex-attention `BlockMask`;
`dense`, one full additive `(N, N)` mask (what eager attention takes); `blocks`, block-sparse:
in DFS order the keys that a block of queries `[a, b)` can see are the ancestors of node a plus
the block itself (an ancestor of a later node in the block that lies before a is an ancestor
of a), so each block attends to those keys only, about the work of running each path alone.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

from forge.tree.masks import dense_tree_mask, flex_tree_block_mask, tree_rule

TREE_KWARG = "forge_tree"  # model(...) keyword that carries the layout to every attention call
QUERY_BLOCK = 256
# transformers' attention implementation -> the name Forge registers its tree attention under
TREE_IMPLEMENTATIONS = {
    "sdpa": "forge_tree_sdpa",
    "eager": "forge_tree_eager",
    "flex_attention": "forge_tree_flex_attention",
}
BASE_IMPLEMENTATIONS = {tree: base for base, tree in TREE_IMPLEMENTATIONS.items()}
# Layer kinds whose attention the tree rule reproduces exactly (transformers' `layer_types`).
EXACT_LAYER_TYPES = {"full_attention", "sliding_attention", "chunked_attention"}
Kind = Literal["flex", "dense", "blocks"]


def layer_types_named(types: list[str]) -> str:
    """`types` for a message; transformers calls SSM (Mamba) layers linear_attention too, which a
    Mamba2 or Zamba2 user would not guess."""
    return ", ".join(
        f"{kind} (SSM or linear attention)" if kind == "linear_attention" else kind for kind in types
    )


@dataclass
class QueryBlock:
    """Queries `[start, end)` attend to nodes `keys` under the additive `mask` `(1, 1, end-start, len(keys))`."""

    start: int
    end: int
    keys: torch.Tensor
    mask: torch.Tensor


def tree_query_blocks(
    subtree_end: np.ndarray,
    dtype: torch.dtype,
    device: torch.device,
    block_size: int | None = None,
    depth: np.ndarray | None = None,
    window: int | None = None,
    chunk: int | None = None,
) -> list[QueryBlock]:
    """Split the nodes into query blocks, each with the only keys its queries may see (under
    `window`, keys too shallow for every query of the block are left out too)."""
    block_size = block_size or QUERY_BLOCK
    n = len(subtree_end)
    ends = torch.as_tensor(subtree_end, device=device)
    depths = None if depth is None else torch.as_tensor(depth, device=device)
    blocks = []
    for start in range(0, n, block_size):
        end = min(start + block_size, n)
        ancestors = np.flatnonzero(subtree_end[:start] > start)
        keys = torch.as_tensor(np.concatenate([ancestors, np.arange(start, end)]), device=device)
        query = torch.arange(start, end, device=device)[:, None]
        allowed = tree_rule(query, keys[None, :], ends, depths, window, chunk)
        if window is not None or chunk is not None:
            seen = allowed.any(dim=0)
            keys, allowed = keys[seen], allowed[:, seen]
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        blocks.append(QueryBlock(start, end, keys, mask[None, None]))
    return blocks


@dataclass
class TreeLayout:
    """One tree micro-batch as its attention calls see it; the masks of each window are built
    once per forward (and its recomputation under gradient checkpointing) and shared by the
    layers that use that window."""

    subtree_end: np.ndarray
    depth: np.ndarray
    kind: Kind
    dtype: torch.dtype
    device: torch.device
    calls: int = 0  # attention calls that received the layout: 0 after a forward = it was dropped
    # Attention calls whose mask was not the placeholder: the model made a mask of its own
    # (a score bias, a dynamic mask) that the tree rule would replace.
    own_masks: int = 0
    _masks: dict[tuple[int | None, int | None], Any] = field(default_factory=dict)

    def mask(self, window: int | None, chunk: int | None = None) -> Any:
        # A window or chunk longer than the deepest node binds nowhere in this tree (a query
        # sees keys fewer than `window` positions back; all depths fall in chunk 0): such
        # layers share the full layers' mask (a 131072 window on any tree of fewer tokens).
        if window is not None or chunk is not None:
            deepest = int(self.depth.max(initial=0))
            window = None if window is not None and window > deepest else window
            chunk = None if chunk is not None and chunk > deepest else chunk
        if (window, chunk) not in self._masks:
            self._masks[window, chunk] = self._build(window, chunk)
        return self._masks[window, chunk]

    def _build(self, window: int | None, chunk: int | None) -> Any:
        if self.kind == "blocks":
            return tree_query_blocks(
                self.subtree_end, self.dtype, self.device, depth=self.depth, window=window, chunk=chunk
            )
        if self.kind == "flex":
            return flex_tree_block_mask(
                self.subtree_end, depth=self.depth, window=window, device=self.device, chunk=chunk
            )
        ends = torch.as_tensor(self.subtree_end, device=self.device)
        depth = torch.as_tensor(self.depth, device=self.device)
        return dense_tree_mask(ends, self.dtype, depth=depth, window=window, chunk=chunk)

    def placeholder_mask(self) -> torch.Tensor:
        """The `attention_mask` a tree forward passes: 4-D, so transformers builds no mask of its
        own and hands it through; the layout carries the real one. All zeros (no masking), so
        a layer that drops the layout attends everywhere and the self-check sees it."""
        n = len(self.subtree_end)
        self._placeholder = torch.zeros((1, 1, 1, 1), dtype=self.dtype, device=self.device)
        return self._placeholder.expand(1, 1, n, n)

    def is_placeholder(self, mask: Any) -> bool:
        """Whether `mask` is (a view of) `placeholder_mask()`'s, as transformers hands it on."""
        placeholder = getattr(self, "_placeholder", None)
        return (
            isinstance(mask, torch.Tensor)
            and placeholder is not None
            and mask.data_ptr() == placeholder.data_ptr()
        )


def attention_chunk(module: torch.nn.Module) -> int | None:
    """The chunk of `module`'s layer where it is a chunked-attention one (Llama 4: transformers
    hands it no keyword, only a mask; the layer's kind is in its config's `layer_types`)."""
    config = getattr(module, "config", None)
    chunk = getattr(config, "attention_chunk_size", None)
    if chunk is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    index = getattr(module, "layer_idx", None)
    if layer_types is None or index is None:
        raise ValueError(
            f"{type(module).__name__} uses chunked attention (attention_chunk_size={chunk}) without saying which "
            "layers chunk (config.layer_types, the module's layer_idx); set trainer.packing: padded"
        )
    return chunk if layer_types[index] == "chunked_attention" else None


def _eager_function(module: torch.nn.Module) -> Callable:
    """The eager attention of `module`'s own modeling file (soft-capping and sinks included)."""
    function = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if function is None:
        raise ValueError(
            f"{type(module).__name__} has no eager_attention_forward in {type(module).__module__}; "
            "Forge's tree attention cannot compute it exactly: set trainer.packing: padded"
        )
    return function


def _needs_eager(kwargs: dict[str, Any]) -> bool:
    """SDPA has no logit soft-cap nor attention sinks; the model's eager code does."""
    return kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None


def _base_function(base: str, module: torch.nn.Module) -> Callable:
    if base == "eager":
        return _eager_function(module)
    from transformers import AttentionInterface

    return AttentionInterface()[base]


def _tree_attention(base: str) -> Callable:
    def forward(module, query, key, value, attention_mask, **kwargs):
        layout: TreeLayout | None = kwargs.pop(TREE_KWARG, None)
        if layout is None:
            return _base_function(base, module)(module, query, key, value, attention_mask, **kwargs)
        layout.calls += 1
        if attention_mask is not None and not layout.is_placeholder(attention_mask):
            layout.own_masks += 1
        mask = layout.mask(kwargs.get("sliding_window"), attention_chunk(module))
        if layout.kind == "flex":
            return _base_function("flex_attention", module)(module, query, key, value, mask, **kwargs)
        function = (
            _eager_function(module)
            if base == "eager" or _needs_eager(kwargs)
            else _base_function("sdpa", module)
        )
        if layout.kind == "dense":
            return function(module, query, key, value, mask, **kwargs)
        outputs = [
            function(
                module,
                query[:, :, block.start : block.end],
                key.index_select(2, block.keys),
                value.index_select(2, block.keys),
                block.mask,
                **kwargs,
            )[0]
            for block in mask
        ]
        return torch.cat(outputs, dim=1), None

    forward.__name__ = f"forge_tree_{base}_attention"
    return forward


_registered = False


def register_tree_attention() -> None:
    """Register Forge's tree attention (and the mask builders of its bases) under
    `TREE_IMPLEMENTATIONS`' names with transformers (idempotent)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    for base, name in TREE_IMPLEMENTATIONS.items():
        AttentionInterface.register(name, _tree_attention(base))
        # A forward without a tree (padded packing, the self-check's separate forwards)
        # gets the mask its base would.
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[base])
    _registered = True


def base_implementation(config: Any) -> str | None:
    """The transformers attention a model computes with, whether or not Forge's tree attention
    wraps it."""
    implementation = getattr(config, "_attn_implementation", None)
    return BASE_IMPLEMENTATIONS.get(implementation, implementation)


def check_tree_support(config: Any) -> None:
    """Raise, naming the setting to change, for a model whose attention the tree rule cannot
    reproduce exactly."""
    name = type(config).__name__
    if (
        getattr(config, "attention_chunk_size", None) is not None
        and getattr(config, "layer_types", None) is None
    ):
        raise ValueError(
            f"{name} uses chunked attention (attention_chunk_size={config.attention_chunk_size}), which "
            "tree packing cannot compute exactly; set trainer.packing: padded"
        )
    other = sorted(set(getattr(config, "layer_types", None) or []) - EXACT_LAYER_TYPES)
    if other:
        raise ValueError(
            f"{name} has layers of type {layer_types_named(other)}, which tree packing cannot compute exactly "
            f"(it reproduces {', '.join(sorted(EXACT_LAYER_TYPES))}); set trainer.packing: padded"
        )
    base = base_implementation(config)
    if base not in TREE_IMPLEMENTATIONS:
        raise ValueError(
            f"tree packing runs on sdpa, eager or flex_attention, not {base!r}; set "
            "trainer.attn_implementation to one of them, or trainer.packing: padded"
        )


def use_tree_attention(model: torch.nn.Module) -> str:
    """Switch `model` (its own config only) to Forge's tree attention over its current
    implementation; idempotent. Returns the base implementation."""
    register_tree_attention()
    config = model.config
    check_tree_support(config)
    base = base_implementation(config)
    if config._attn_implementation != TREE_IMPLEMENTATIONS[base]:
        config._attn_implementation = TREE_IMPLEMENTATIONS[base]
    return base
