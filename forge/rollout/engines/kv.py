"""`_RoomyLayer`: a transformers cache layer that grows in place, so decoding appends to
the KV instead of copying it for every token.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer


class _RoomyLayer(DynamicLayer):
    """A full-attention cache layer with room to grow. New keys and values are written in
    place (DynamicLayer concatenates, copying the whole cache for every decoded token);
    when the room runs out it doubles. `keys`/`values` are views of the filled part."""

    def __init__(self, room: int = 0) -> None:
        super().__init__()
        self.length = 0
        self._room = room
        self._keys: torch.Tensor | None = None
        self._values: torch.Tensor | None = None

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> _RoomyLayer:
        """A layer over these buffers, of which the first `length` positions are filled."""
        layer = cls()
        layer.device, layer.is_initialized = keys.device, True
        layer._keys, layer._values, layer.length = keys, values, length
        layer._expose()
        return layer

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.is_initialized = key_states.device, True
        shape = (*key_states.shape[:2], key_states.shape[2] + self._room, key_states.shape[3])
        self._keys = key_states.new_empty(shape)
        self._values = value_states.new_empty((*shape[:3], value_states.shape[3]))

    def reserve(self, extra: int) -> None:
        """Make room for `extra` more positions."""
        if not self.is_initialized:
            self._room = max(self._room, extra)
            return
        need = self.length + extra
        if need <= self._keys.shape[2]:
            return
        capacity = max(need, 2 * self._keys.shape[2])
        for name in ("_keys", "_values"):
            old = getattr(self, name)
            new = old.new_empty((old.shape[0], old.shape[1], capacity, old.shape[3]))
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)
        self._expose()

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self.reserve(n)
        self._keys[:, :, self.length : self.length + n] = key_states
        self._values[:, :, self.length : self.length + n] = value_states
        self.length += n
        self._expose()
        return self.keys, self.values

    def _expose(self) -> None:
        self.keys = self._keys[:, :, : self.length]
        self.values = self._values[:, :, : self.length]

    def get_seq_length(self) -> int:
        return self.length

    def row(self, row: int, columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Row `row`'s keys and values at these columns, as `[1, heads, len(columns), dim]`; None
        where the layer never held any (it reads another layer's KV: Gemma 3n's shared layers)."""
        if not self.is_initialized:
            return None
        return self.keys[row : row + 1, :, columns], self.values[row : row + 1, :, columns]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized:
            self._keys, self._values = self._keys[indices], self._values[indices]
            self._expose()

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            self._keys = self._keys.repeat_interleave(repeats, dim=0)
            self._values = self._values.repeat_interleave(repeats, dim=0)
            self._expose()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative count of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)
        if self.is_initialized:
            self._expose()

    def reset(self) -> None:
        super().reset()
        self.length = 0
        self._keys = self._values = None
