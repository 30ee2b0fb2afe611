"""The prefix tree's layout and the micro-batch partition, without a model."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from forge.tree import build_prefix_tree, microbatches, tree_token_ratio
from forge.tree.attention import tree_query_blocks
from forge.types import Sample


def make_sample(tokens: list[int], advantage: float = 1.0) -> Sample:
    n = len(tokens)
    return Sample(list(tokens), [1] * n, [0.0] * n, [0] * n, advantage)


@st.composite
def sharing_sequences(draw, max_samples: int = 8, vocab: int = 6) -> list[list[int]]:
    """Sequences that branch off earlier ones at random depths: shared prefixes,
    duplicates, prefixes of others and single-token branches all occur."""
    tokens = st.integers(0, vocab - 1)
    sequences = [draw(st.lists(tokens, min_size=1, max_size=12))]
    for _ in range(draw(st.integers(0, max_samples - 1))):
        base = draw(st.sampled_from(sequences))
        cut = draw(st.integers(0, len(base)))
        suffix = draw(st.lists(tokens, min_size=0 if cut else 1, max_size=6))
        sequences.append(base[:cut] + suffix)
    return draw(st.permutations(sequences))


def ancestors_or_self(parent: np.ndarray, node: int) -> set[int]:
    found = set()
    while node >= 0:
        found.add(node)
        node = int(parent[node])
    return found


@settings(max_examples=50, deadline=None)
@given(sharing_sequences())
def test_every_sample_reads_back_its_own_tokens_at_depth_positions(sequences):
    tree = build_prefix_tree(sequences)
    for tokens, nodes in zip(sequences, tree.sample_nodes, strict=True):
        assert tree.token_ids[nodes].tolist() == tokens
        assert tree.position_ids[nodes].tolist() == list(range(len(tokens)))
        assert tree.parent[nodes].tolist() == [-1] + nodes[:-1].tolist()


@settings(max_examples=50, deadline=None)
@given(sharing_sequences())
def test_each_distinct_prefix_is_one_node(sequences):
    prefixes = {tuple(s[: i + 1]) for s in sequences for i in range(len(s))}
    assert build_prefix_tree(sequences).num_nodes == len(prefixes)


@settings(max_examples=50, deadline=None)
@given(sharing_sequences())
def test_attention_rule_is_exactly_ancestor_or_self(sequences):
    tree = build_prefix_tree(sequences)
    allowed = tree.attention_allowed()
    for query in range(tree.num_nodes):
        assert set(np.flatnonzero(allowed[query]).tolist()) == ancestors_or_self(tree.parent, query)


@settings(max_examples=50, deadline=None)
@given(sharing_sequences(), st.integers(1, 8))
def test_query_blocks_hold_exactly_the_rule_for_their_keys(sequences, block_size):
    tree = build_prefix_tree(sequences)
    allowed = torch.as_tensor(tree.attention_allowed())
    covered = torch.zeros_like(allowed)
    for block in tree_query_blocks(tree.subtree_end, torch.float32, torch.device("cpu"), block_size):
        visible = block.mask[0, 0] == 0
        assert torch.equal(visible, allowed[block.start : block.end][:, block.keys])
        covered[block.start : block.end, block.keys] = visible
    assert torch.equal(covered, allowed)  # no allowed pair is left out of every block


def test_nodes_are_in_dfs_pre_order():
    tree = build_prefix_tree([[5, 1, 2], [5, 1, 3], [4], [5, 9]])
    assert tree.token_ids.tolist() == [4, 5, 1, 2, 3, 9]
    assert tree.position_ids.tolist() == [0, 0, 1, 2, 2, 1]
    assert tree.subtree_end.tolist() == [1, 6, 5, 4, 5, 6]


@settings(max_examples=50, deadline=None)
@given(sharing_sequences(max_samples=12), st.integers(12, 60))
def test_partition_covers_each_sample_once_within_budget(sequences, budget):
    budget = max(budget, *(len(s) for s in sequences))  # a longer sample is refused, not partitioned
    samples = [make_sample(s) for s in sequences]
    batches = microbatches(samples, "tree", budget)
    assert sorted(i for b in batches for i in b.sample_indices) == list(range(len(samples)))
    assert all(b.tokens_computed <= budget for b in batches)
    assert sum(b.tokens_separate for b in batches) == sum(len(s) for s in sequences)


def test_one_micro_batch_computes_each_shared_token_once():
    prompt = list(range(100))
    samples = [make_sample(prompt + [200 + i] * 10) for i in range(4)]
    batches = microbatches(samples, "tree", max_tokens_per_microbatch=1000)
    assert [b.tokens_computed for b in batches] == [100 + 4 * 10]
    assert tree_token_ratio(batches) == pytest.approx(4 * 110 / 140)


def test_a_prefix_split_across_micro_batches_is_computed_and_counted_again():
    prompt = list(range(100))
    samples = [make_sample(prompt + [200 + i] * 10) for i in range(4)]
    batches = microbatches(samples, "tree", max_tokens_per_microbatch=125)
    assert [b.tokens_computed for b in batches] == [120, 120]
    assert tree_token_ratio(batches) == pytest.approx(4 * 110 / 240)


def test_padded_packing_counts_padding_as_computed():
    samples = [make_sample([1] * 10), make_sample([2] * 6)]
    batches = microbatches(samples, "padded", max_tokens_per_microbatch=20)
    assert [(b.sample_indices, b.tokens_computed) for b in batches] == [([0, 1], 20)]
    assert tree_token_ratio(batches) == pytest.approx(16 / 20)


def test_padded_packing_splits_when_padded_batch_exceeds_budget():
    samples = [make_sample([1] * 10), make_sample([2] * 6), make_sample([3] * 6)]
    batches = microbatches(samples, "padded", max_tokens_per_microbatch=19)
    assert all(b.tokens_computed <= 19 for b in batches)
    assert sorted(i for b in batches for i in b.sample_indices) == [0, 1, 2]


def test_sample_longer_than_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="max_tokens_per_microbatch=8"):
        microbatches([make_sample(list(range(9)))], "tree", max_tokens_per_microbatch=8)


def test_unknown_packing_is_a_clear_error():
    with pytest.raises(ValueError, match="trainer.packing"):
        microbatches([make_sample([1, 2])], "dense", max_tokens_per_microbatch=8)


def test_a_sample_longer_than_the_budget_is_refused_with_the_key_to_raise():
    with pytest.raises(ValueError, match="more than trainer.max_tokens_per_microbatch=12"):
        microbatches([make_sample([1] * 7), make_sample([2] * 13)], "tree", 12)


@settings(max_examples=50, deadline=None)
@given(sharing_sequences(), st.integers(1, 6), st.one_of(st.none(), st.integers(1, 8)))
def test_flex_block_layout_covers_the_rule_and_marks_full_only_fully_allowed_blocks(
    sequences, block_size, window
):
    from forge.tree.masks import tree_block_layout, tree_rule

    tree = build_prefix_tree(sequences)
    ends, depth = torch.as_tensor(tree.subtree_end), torch.as_tensor(tree.position_ids)
    nodes = torch.arange(tree.num_nodes)
    allowed = tree_rule(nodes[:, None], nodes[None, :], ends, depth, window)
    partial, full = (
        torch.as_tensor(b) for b in tree_block_layout(tree.subtree_end, block_size, tree.position_ids, window)
    )
    assert not (partial & full).any()
    for i in range(partial.shape[0]):
        for j in range(partial.shape[1]):
            block = allowed[i * block_size : (i + 1) * block_size, j * block_size : (j + 1) * block_size]
            if block.any():
                assert partial[i, j] or full[i, j]  # no allowed pair is skipped
            if full[i, j]:
                assert block.all() and block.shape == (block_size, block_size)
            if window is None:  # without a window the layout is exact, not just safe
                assert bool(partial[i, j] or full[i, j]) == bool(block.any())
                assert (
                    bool(full[i, j]) == bool(block.all() and block.shape == (block_size, block_size))
                    or i == j
                )


@pytest.mark.parametrize("kind", ["dense", "blocks"])
def test_a_window_or_chunk_longer_than_the_tree_shares_the_full_layers_mask(kind):
    """A query sees keys fewer than `window` positions back: on a tree whose deepest node is at
    depth 8 a window of 9 (or a chunk of 9) binds nowhere, so those layers take the full mask
    (one mask built, not two); a window of 8 still drops the root from the deepest query."""
    from forge.tree.attention import TreeLayout

    tree = build_prefix_tree([list(range(9)), [0, 1, 2, 7]])
    assert tree.position_ids.max() == 8
    layout = TreeLayout(tree.subtree_end, tree.position_ids, kind, torch.float32, torch.device("cpu"))
    full = layout.mask(None)
    assert layout.mask(9) is full and layout.mask(131072) is full and layout.mask(None, chunk=9) is full
    assert layout.mask(8) is not full and layout.mask(None, chunk=8) is not full
    dense = TreeLayout(tree.subtree_end, tree.position_ids, "dense", torch.float32, torch.device("cpu"))
    assert dense.mask(8)[0, 0, 8, 0] < 0 and dense.mask(9)[0, 0, 8, 0] == 0
