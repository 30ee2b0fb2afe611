"""The prefix tree of a list of token sequences, laid out in DFS pre-order.

Built from the sequences sorted lexicographically: in that order each sequence shares
with the trie exactly its longest common prefix with the previous one, and emitting
each sequence's remaining suffix in turn is the trie's DFS pre-order (children visited
in token order). That keeps the build to one sort plus numpy work per sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class PrefixTree:
    """A forest of token-id tries in DFS pre-order; N nodes, one token each.

    `token_ids[i]`, `position_ids[i]` (= depth, roots at 0), `parent[i]` (-1 for roots)
    and `subtree_end[i]` (one past the last descendant of i) describe node i.
    `sample_nodes[s]` maps sequence s's token positions to node indices, in the order
    the sequences were given.
    """

    token_ids: np.ndarray
    position_ids: np.ndarray
    parent: np.ndarray
    subtree_end: np.ndarray
    sample_nodes: list[np.ndarray]

    @property
    def num_nodes(self) -> int:
        return len(self.token_ids)

    def attention_allowed(self) -> np.ndarray:
        """Dense `(N, N)` rule: query q sees key k iff k <= q < subtree_end[k]."""
        q = np.arange(self.num_nodes)[:, None]
        k = np.arange(self.num_nodes)[None, :]
        return (k <= q) & (q < self.subtree_end[None, :])


def lexicographic_order(sequences: Sequence[Sequence[int]]) -> list[int]:
    """Indices of `sequences` sorted by their token ids (a prefix sorts before its extensions)."""
    return sorted(range(len(sequences)), key=lambda i: list(sequences[i]))


def common_prefix_length(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    mismatch = np.flatnonzero(a[:n] != b[:n])
    return int(mismatch[0]) if len(mismatch) else n


class TreeOrder:
    """Sequences in their prefix tree's order (lexicographic), with what any contiguous run
    of that order costs as one tree: `run_size(a, b)` is the node count of the tree of
    order[a:b], its first sequence's length plus each later one's length beyond its common
    prefix with the one before."""

    def __init__(self, sequences: Sequence[Sequence[int]]) -> None:
        self.order = lexicographic_order(sequences)
        arrays = [np.asarray(sequences[i], dtype=np.int64) for i in self.order]
        self.lengths = np.array([len(a) for a in arrays], dtype=np.int64)
        self.shared = np.zeros(len(arrays), dtype=np.int64)  # common prefix with the one before
        for j in range(1, len(arrays)):
            self.shared[j] = common_prefix_length(arrays[j - 1], arrays[j])
        self._new = np.concatenate([[0], np.cumsum(self.lengths - self.shared)])

    def __len__(self) -> int:
        return len(self.order)

    def run_size(self, start: int, end: int) -> int:
        return int(self._new[end] - self._new[start] + self.shared[start])


def build_prefix_tree(sequences: Sequence[Sequence[int]]) -> PrefixTree:
    """Merge `sequences` into a prefix tree; duplicates and prefixes of others add no nodes."""
    if any(len(s) == 0 for s in sequences):
        raise ValueError("build_prefix_tree: every sequence needs at least one token")
    arrays = [np.asarray(s, dtype=np.int64) for s in sequences]
    order = lexicographic_order(sequences)

    shared = np.zeros(len(order), dtype=np.int64)  # common prefix with the previous sorted sequence
    starts = np.zeros(len(order), dtype=np.int64)  # node index where its new suffix begins
    sample_nodes: list[np.ndarray] = [np.empty(0, dtype=np.int64)] * len(arrays)
    token_parts, depth_parts = [], []
    num_nodes = 0
    previous: np.ndarray | None = None
    previous_nodes = np.empty(0, dtype=np.int64)
    for rank, index in enumerate(order):
        tokens = arrays[index]
        lcp = 0 if previous is None else common_prefix_length(previous, tokens)
        shared[rank], starts[rank] = lcp, num_nodes
        new = len(tokens) - lcp
        nodes = np.concatenate([previous_nodes[:lcp], np.arange(num_nodes, num_nodes + new)])
        token_parts.append(tokens[lcp:])
        depth_parts.append(np.arange(lcp, len(tokens)))
        sample_nodes[index] = nodes
        num_nodes += new
        previous, previous_nodes = tokens, nodes

    token_ids = np.concatenate(token_parts)
    position_ids = np.concatenate(depth_parts)
    parent = np.full(num_nodes, -1, dtype=np.int64)
    subtree_end = np.full(num_nodes, num_nodes, dtype=np.int64)
    # A node at depth d emitted by sorted sequence r ends its subtree where the first later
    # sequence that branches off at depth <= d starts. A stack of later sequences with
    # strictly decreasing branch depth (top = nearest) answers that for all depths at once.
    stack: list[tuple[int, int]] = []  # (branch depth, start node)
    for rank in range(len(order) - 1, -1, -1):
        index = order[rank]
        lcp, start, length = int(shared[rank]), int(starts[rank]), len(arrays[index])
        if length > lcp:
            nodes = sample_nodes[index]
            parent[start + (1 if lcp == 0 else 0) : start + length - lcp] = nodes[
                max(lcp, 1) - 1 : length - 1
            ]
            upper = length  # depths [lower, upper) of this suffix still to assign
            for branch_depth, end in reversed(stack):
                lower = max(branch_depth, lcp)
                if lower < upper:
                    subtree_end[start + lower - lcp : start + upper - lcp] = end
                    upper = lower
                if upper <= lcp:
                    break
        while stack and stack[-1][0] >= lcp:
            stack.pop()
        stack.append((lcp, start))
    return PrefixTree(token_ids, position_ids, parent, subtree_end, sample_nodes)
