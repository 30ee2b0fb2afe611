"""Sliding-window (and chunked) attention masks over the engine's kept KV batch, by position.

The batch lays rows out with pad holes (`[pad][cached KV][pad][new tokens]`), and transformers
counts a sliding window in cache columns, so over a hole it would reach fewer real tokens than
the window: behaviour logprobs would not be the policy's. These masks count it in positions
(a key is seen iff it is real, not later, and less than a window behind), as a fresh forward
of each row does. Models without a sliding window keep transformers' own masks, and so do
models whose windows are longer than any row can be (`Windows.longest`, the engine's context),
while the batch's columns are fewer than the windows too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Windows:
    """A model's sliding window (or None), and its attention chunk where layers chunk
    (Llama 4); `per_layer_type` when its layers differ (transformers' `layer_types`), so the
    model takes one mask per layer type, else one for every layer."""

    window: int | None
    per_layer_type: bool
    chunk: int | None = None
    # The most tokens a row can hold (the engine's rollout.max_context_tokens), when known. A
    # window or chunk longer than it never binds: a query sees keys fewer than `window`
    # positions back, and a row's positions all fall in chunk 0 (one token of margin, as the
    # trainer's self-check keeps, for a family that counts its window one further).
    longest: int | None = None

    def binding(self, size: int | None) -> int | None:
        """`size` (the window or the chunk) where some row can reach past it, else None."""
        return size if size is not None and (self.longest is None or size <= self.longest) else None

    @property
    def binds(self) -> bool:
        """Whether any window or chunk can bind: else every layer attends as full attention."""
        return self.binding(self.window) is not None or self.binding(self.chunk) is not None

    def reached_in(self, columns: int) -> bool:
        """Whether transformers' own masks, which count windows and chunks in the batch's
        columns (pad holes included), see all `columns` columns: fewer than every size."""
        return all(size is None or columns < size for size in (self.window, self.chunk))


def _size(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def sliding_windows(config: Any, longest: int | None = None) -> Windows | None:
    """The sliding window and attention chunk `config` applies, or None when no layer slides
    or chunks; `longest`: the most tokens a row can hold (see `Windows.longest`)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = _size(getattr(config, "sliding_window", None))
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        window = window if "sliding_attention" in layer_types else None
        chunk = (
            _size(getattr(config, "attention_chunk_size", None))
            if "chunked_attention" in layer_types
            else None
        )
        return Windows(window, True, chunk, longest) if window is not None or chunk is not None else None
    return Windows(window, False, longest=longest) if window is not None else None


def positional_masks(
    mask: torch.Tensor, new_tokens: int, windows: Windows, dtype: torch.dtype
) -> torch.Tensor | dict[str, torch.Tensor]:
    """Additive 4-D masks `(rows, 1, new_tokens, columns)` for the last `new_tokens` columns of
    the 2-D `mask` (1 = a real token), with the window counted in positions; a window or chunk
    that cannot bind (`Windows.binding`) gets the full-attention mask."""
    valid = mask.bool()
    columns = torch.arange(mask.shape[1], device=mask.device)
    position = valid.long().cumsum(-1) - 1  # of each real column; the row's tokens are in order
    query = slice(mask.shape[1] - new_tokens, None)
    allowed = valid[:, None, :] & (columns[None, None, :] <= columns[query][None, :, None])

    def additive(keep: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(keep.shape, dtype=dtype, device=mask.device)
        return out.masked_fill_(~keep, torch.finfo(dtype).min)[:, None]

    window, chunk = windows.binding(windows.window), windows.binding(windows.chunk)
    in_window = allowed
    if window is not None:
        in_window = allowed & (position[:, query, None] - position[:, None, :] < window)
    if not windows.per_layer_type:
        return additive(in_window)
    full = additive(allowed)
    masks = {"full_attention": full}
    if windows.window is not None:
        masks["sliding_attention"] = additive(in_window) if window is not None else full
    if windows.chunk is not None:
        masks["chunked_attention"] = full
        if chunk is not None:
            same_chunk = position[:, query, None] // chunk == position[:, None, :] // chunk
            masks["chunked_attention"] = additive(allowed & same_chunk)
    return masks
