"""Micro-batches of samples under a token budget, and their forward pass to per-sample logprobs.

Two packings, same results: `tree` merges shared prefixes into one DFS-ordered sequence
per micro-batch (each shared token computed once per micro-batch); `padded` right-pads
whole samples into a `(B, L)` batch, the baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from forge.tree.attention import TREE_KWARG, TreeLayout, base_implementation, use_tree_attention
from forge.tree.trie import PrefixTree, TreeOrder, build_prefix_tree
from forge.types import Sample

Packing = Literal["tree", "padded"]
Attention = Literal["auto", "dense", "flex"]


@dataclass
class MicroBatch:
    """Samples run through the model together.

    `tokens_computed` counts the positions the model actually runs: tree nodes for `tree`,
    `B * L` including padding for `padded`. `tokens_separate` is the samples' own length sum.
    """

    sample_indices: list[int]
    token_ids: list[list[int]]
    packing: Packing
    attention: Attention
    tokens_computed: int
    tokens_separate: int
    tree: PrefixTree | None = None

    def forward_logprobs(self, model: torch.nn.Module, temperature: float = 1.0) -> list[torch.Tensor]:
        """Per sample (in `sample_indices` order) a 1-D tensor of length `len(token_ids) - 1`:
        element t = log p(token_ids[t+1] | token_ids[:t+1]) under softmax(logits /
        `temperature`), the distribution the rollout engine samples from, with the autograd
        graph attached."""
        return self._forward(model, entropy=False, temperature=temperature)[0]

    def forward_logprobs_and_entropy(
        self, model: torch.nn.Module, temperature: float = 1.0
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """`forward_logprobs`, plus per sample the entropy of the policy's next-token
        distribution at the same positions (with grad). Holds one more `(N, V)` tensor."""
        logprobs, entropy = self._forward(model, entropy=True, temperature=temperature)
        assert entropy is not None
        return logprobs, entropy

    def _forward(
        self, model: torch.nn.Module, entropy: bool, temperature: float
    ) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        if self.packing == "tree":
            logits, rows, targets = _tree_logits(model, self.tree, self.token_ids, self.attention)
        else:
            logits, rows, targets = _padded_logits(model, self.token_ids)
        logprobs, entropies = _token_logprobs(logits, rows, targets, entropy, temperature)
        lengths = [len(t) - 1 for t in self.token_ids]
        split = list(torch.split(logprobs, lengths))
        return split, (list(torch.split(entropies, lengths)) if entropies is not None else None)


def microbatches(
    samples: Sequence[Sample],
    packing: Packing,
    max_tokens_per_microbatch: int,
    attention: Attention = "auto",
) -> list[MicroBatch]:
    """Partition `samples` into micro-batches of at most `max_tokens_per_microbatch` computed tokens.

    `attention` picks how a tree micro-batch is masked: `flex` a flex-attention BlockMask
    (the model must be loaded with attn_implementation="flex_attention"; its backward needs
    CUDA in torch 2.13), `dense` the same rule without flex (block-sparse SDPA on sdpa models,
    a full additive mask otherwise), `auto` flex exactly when the model uses flex attention.
    Padded micro-batches use the model's own causal + padding mask either way.
    """
    if packing not in ("tree", "padded"):
        raise ValueError(f"trainer.packing must be 'tree' or 'padded', got {packing!r}")
    if attention not in ("auto", "dense", "flex"):
        raise ValueError(f"trainer.attention must be 'auto', 'dense' or 'flex', got {attention!r}")
    token_ids = [list(s.token_ids) for s in samples]
    for index, tokens in enumerate(token_ids):
        if not tokens:
            raise ValueError(f"sample {index} has no tokens; drop empty samples before training")
        if len(tokens) > max_tokens_per_microbatch:
            raise ValueError(
                f"sample {index} has {len(tokens)} tokens, more than trainer.max_tokens_per_microbatch="
                f"{max_tokens_per_microbatch}; raise the budget or truncate the sample"
            )
    if packing == "padded":
        return _padded_microbatches(token_ids, max_tokens_per_microbatch, attention)
    return _tree_microbatches(token_ids, max_tokens_per_microbatch, attention)


def tree_token_ratio(batches: Sequence[MicroBatch]) -> float:
    """Tokens of the separate sequences / tokens actually computed (repeated prefixes and
    padding count as computed)."""
    computed = sum(b.tokens_computed for b in batches)
    return sum(b.tokens_separate for b in batches) / computed if computed else 1.0


def _padded_microbatches(token_ids: list[list[int]], budget: int, attention: Attention) -> list[MicroBatch]:
    # Longest first, so each batch pads to lengths close to its own: the fair baseline.
    order = sorted(range(len(token_ids)), key=lambda i: -len(token_ids[i]))
    batches: list[MicroBatch] = []
    group: list[int] = []
    for index in order:
        width = len(token_ids[group[0]]) if group else len(token_ids[index])
        if group and (len(group) + 1) * width > budget:
            batches.append(_padded_batch(group, token_ids, attention))
            group = []
        group.append(index)
    if group:
        batches.append(_padded_batch(group, token_ids, attention))
    return batches


def _padded_batch(group: list[int], token_ids: list[list[int]], attention: Attention) -> MicroBatch:
    rows = [token_ids[i] for i in group]
    width = max(len(r) for r in rows)
    return MicroBatch(
        sample_indices=list(group),
        token_ids=rows,
        packing="padded",
        attention=attention,
        tokens_computed=len(rows) * width,
        tokens_separate=sum(len(r) for r in rows),
    )


def _tree_microbatches(token_ids: list[list[int]], budget: int, attention: Attention) -> list[MicroBatch]:
    """Cut the lexicographic order (the trie's DFS order) into runs, each run's tree within
    `budget`, minimising total computed tokens first. Among equal totals, flex prefers fewer
    micro-batches (its block mask skips masked blocks), while dense attention prefers the
    smallest sum of squared sizes: a full dense mask (eager attention) costs N^2 per
    micro-batch, so unrelated subtrees are cheaper apart than packed together.

    A run's tree size is its first sample's length plus each later sample's length beyond
    its common prefix with the one before; a cut inside a shared prefix makes the next run
    compute that prefix again, which the ratio counts.
    """
    tree_order = TreeOrder(token_ids)
    order = tree_order.order
    n = len(order)
    best: list[tuple[int, int]] = [(0, 0)] + [(1 << 62, 0)] * n  # (tokens, tie-break) for ranks < j
    cut = [0] * (n + 1)
    for end in range(1, n + 1):
        for start in range(end - 1, -1, -1):
            size = tree_order.run_size(start, end)
            if size > budget:
                break  # size only grows as the run extends left
            candidate = (best[start][0] + size, best[start][1] + (1 if attention == "flex" else size * size))
            if candidate < best[end]:
                best[end], cut[end] = candidate, start
    runs = []
    end = n
    while end > 0:
        runs.append(order[cut[end] : end])
        end = cut[end]
    batches = []
    for run in reversed(runs):
        rows = [token_ids[i] for i in run]
        tree = build_prefix_tree(rows)
        batches.append(
            MicroBatch(
                sample_indices=list(run),
                token_ids=rows,
                packing="tree",
                attention=attention,
                tokens_computed=tree.num_nodes,
                tokens_separate=sum(len(r) for r in rows),
                tree=tree,
            )
        )
    return batches


def _model_dtype_device(model: torch.nn.Module) -> tuple[torch.dtype, torch.device]:
    weight = model.get_input_embeddings().weight
    return weight.dtype, weight.device


def _layout_kind(model: torch.nn.Module, attention: Attention) -> str:
    """How the tree rule is laid out for `model`: a flex BlockMask on flex models (`auto`,
    `flex`), else block-sparse (`blocks`) on sdpa and flex models, a full mask on eager ones."""
    implementation = base_implementation(model.config)
    if attention == "flex" and implementation != "flex_attention":
        raise ValueError(
            f"trainer.attention='flex' needs the model loaded with attn_implementation='flex_attention' "
            f"(it has {implementation!r}); set trainer.attn_implementation: flex_attention, or use attention "
            "'dense' or 'auto'"
        )
    if implementation == "flex_attention" and attention != "dense":
        return "flex"
    return "dense" if implementation == "eager" else "blocks"


def _no_router_loss(model: torch.nn.Module) -> dict[str, bool]:
    """Mixture-of-experts models: the forward computes no router auxiliary loss. Forge trains
    on the policy loss alone (the load-balancing loss depends on which tokens a forward holds,
    so it would differ between tree, padded and separate forwards)."""
    return {"output_router_logits": False} if hasattr(model.config, "output_router_logits") else {}


def _token_logprobs(
    logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, entropy: bool, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log_softmax(logits / temperature)[rows, targets], without materialising a second
    `(N, V)` tensor unless `entropy` is asked for too (then also -sum p log p at each of
    `rows`) or the temperature is not 1."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    log_normaliser = torch.logsumexp(logits, dim=-1)
    logprobs = logits[rows, targets] - log_normaliser[rows]
    if not entropy:
        return logprobs, None
    log_p = logits - log_normaliser[:, None]
    return logprobs, -(log_p.exp() * log_p).sum(dim=-1)[rows]


def _tree_logits(
    model: torch.nn.Module, tree: PrefixTree, token_ids: list[list[int]], attention: Attention
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The tree's logits `(nodes, V)`, and for every sample token after the first (in
    sample order) the row that predicts it and its id."""
    dtype, device = _model_dtype_device(model)
    kind = _layout_kind(model, attention)
    use_tree_attention(model)
    layout = TreeLayout(tree.subtree_end, tree.position_ids, kind, dtype, device)
    input_ids = torch.as_tensor(tree.token_ids, device=device)[None]
    position_ids = torch.as_tensor(tree.position_ids, device=device)[None]
    logits = model(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=layout.placeholder_mask(),
        use_cache=False,
        **_no_router_loss(model),
        **{TREE_KWARG: layout},
    ).logits
    if layout.calls == 0:
        raise ValueError(
            f"{type(model).__name__}'s attention never received Forge's tree layout (its forward drops the "
            f"{TREE_KWARG!r} keyword), so tree packing cannot run on it; set trainer.packing: padded"
        )
    if layout.own_masks:
        raise ValueError(
            f"{type(model).__name__}'s attention makes a mask of its own (it changes the attention scores beyond "
            "causal masking, e.g. a learned or dynamic bias), which Forge's tree rule would replace: its gradients "
            "would be wrong even where its logprobs agree; set trainer.packing: padded"
        )
    # The logprob of a sample's token t+1 is read at the node holding its token t (the parent).
    rows = torch.as_tensor(np.concatenate([nodes[:-1] for nodes in tree.sample_nodes]), device=device)
    targets = torch.as_tensor(
        np.concatenate([np.asarray(t[1:], dtype=np.int64) for t in token_ids]), device=device
    )
    return logits[0], rows, targets


def _padded_logits(
    model: torch.nn.Module, token_ids: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """As `_tree_logits`, from a right-padded `(B, L)` batch flattened to `(B * L, V)`."""
    _, device = _model_dtype_device(model)
    width = max(len(t) for t in token_ids)
    input_ids = torch.zeros((len(token_ids), width), dtype=torch.long, device=device)
    attention_mask = torch.zeros((len(token_ids), width), dtype=torch.long, device=device)
    for row, tokens in enumerate(token_ids):
        input_ids[row, : len(tokens)] = torch.as_tensor(tokens)
        attention_mask[row, : len(tokens)] = 1
    logits = model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **_no_router_loss(model)
    ).logits
    row_index = torch.cat([torch.full((len(t) - 1,), r, dtype=torch.long) for r, t in enumerate(token_ids)])
    col_index = torch.cat([torch.arange(len(t) - 1) for t in token_ids])
    targets = torch.cat([torch.as_tensor(t[1:], dtype=torch.long) for t in token_ids])
    flat_logits = logits.reshape(-1, logits.shape[-1])
    return flat_logits, (row_index * width + col_index).to(device), targets.to(device)
