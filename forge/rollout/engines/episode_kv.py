"""An episode's cached KV, and which cached KV a request can start from.

The engine (forge.rollout.engines.hf) keeps each episode's KV between its calls. A request
starts from: its own episode's cache, all of it when it extends the cached tokens, else the
part before they part (a client that re-renders a reply, or a reply cut at a stop string,
differs from the sampled tokens from that turn on); with no cache of its own, the longest
prefix another episode's cache holds (`borrowed`: a group's prompt whose other episodes came
in an earlier call, a system prompt every task shares); and new rows of one call that start
alike run that start once (`common_starts`). The KV of the same tokens under the same weights
is the same whichever episode ran them, so each is exact. A request's last token is never
taken from a cache: it is run for the logits it samples from.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

# The fewest tokens a new episode takes from another episode's cache, as vLLM's prefix cache
# shares whole blocks of 16: a chat template's opening tokens alone are prefilled.
BORROW_MIN_TOKENS = 16
# The fewest tokens that new rows of one call, starting alike, run once apart rather than each
# in its row. The forward more breaks even at about 32 on the CPU bench model (4 rows: 0.86x
# the time at 64, 0.75x at 128; bench.prefix_reuse's start-N); a GPU's forward costs more
# against its tokens, so the bar is higher than that (not measured there).
SHARED_START_MIN_TOKENS = 128


@dataclass
class EpisodeKV:
    """An episode's KV cache: per layer (keys, values) of shape [1, heads, len, dim] for
    exactly the tokens in `token_ids`, no padding; None for a layer that keeps no KV of its own
    (it reads another layer's, as Gemma 3n's KV-shared layers do)."""

    token_ids: list[int]
    layers: list[tuple[torch.Tensor, torch.Tensor] | None]

    @functools.cached_property
    def array(self) -> np.ndarray:
        return np.asarray(self.token_ids, dtype=np.int64)

    def shared_with(self, tokens: np.ndarray) -> int:
        """How many leading tokens this cache has in common with `tokens`."""
        return shared_length(self.array, tokens)

    def prefix(self, n: int) -> EpisodeKV:
        """The KV of this cache's first `n` tokens (views of its tensors, nothing copied)."""
        if n == len(self.token_ids):
            return self
        layers = [None if held is None else (held[0][:, :, :n], held[1][:, :, :n]) for held in self.layers]
        return EpisodeKV(self.token_ids[:n], layers)


def before_last(tokens: list[int]) -> np.ndarray:
    """A request's tokens that a cache may hold: all but the last."""
    return np.asarray(tokens[:-1], dtype=np.int64)


def shared_length(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens `a` and `b` have in common."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n


def kept_part(own: EpisodeKV, tokens: list[int]) -> EpisodeKV | None:
    """What of an episode's own cache a request of `tokens` starts from: all of it when they
    extend it, else the part before they part; None when nothing is shared."""
    shared = own.shared_with(before_last(tokens))
    return own.prefix(shared) if shared else None


def borrowed(tokens: list[int], donors: list[EpisodeKV]) -> EpisodeKV | None:
    """The longest prefix of `tokens` any of `donors` holds, if at least BORROW_MIN_TOKENS."""
    wanted = before_last(tokens)
    best, longest = None, BORROW_MIN_TOKENS - 1
    for donor in donors:
        if donor.token_ids[0] == tokens[0]:
            shared = donor.shared_with(wanted)
            if shared > longest:
                best, longest = donor, shared
    return best.prefix(longest) if best is not None else None


def common_starts(rows: list[int], requests: list[Any]) -> list[tuple[list[int], int]]:
    """Runs of two or more of these rows whose tokens (all but the last) begin alike for at
    least SHARED_START_MIN_TOKENS, each with how many they share: the rows in order of their
    tokens, a run cut where a row shares fewer with the one before."""
    order = sorted(rows, key=lambda row: requests[row].token_ids)
    arrays = {row: before_last(requests[row].token_ids) for row in rows}
    runs: list[tuple[list[int], int]] = []
    run: list[int] = order[:1]
    length = 0
    for before, row in zip(order, order[1:], strict=False):
        shared = shared_length(arrays[before], arrays[row])
        if shared >= SHARED_START_MIN_TOKENS:
            run.append(row)
            length = shared if len(run) == 2 else min(length, shared)
            continue
        if len(run) > 1:
            runs.append((run, length))
        run = [row]
    if len(run) > 1:
        runs.append((run, length))
    return runs
