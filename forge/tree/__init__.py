"""Prefix-tree packing: merge samples that share context so each shared token is computed
once, and read every sample's own logprobs back out, exactly as separate forwards would."""

from forge.tree.masks import dense_tree_mask, flex_tree_block_mask
from forge.tree.microbatch import MicroBatch, microbatches, tree_token_ratio
from forge.tree.trie import PrefixTree, build_prefix_tree

__all__ = [
    "MicroBatch",
    "PrefixTree",
    "build_prefix_tree",
    "dense_tree_mask",
    "flex_tree_block_mask",
    "microbatches",
    "tree_token_ratio",
]
