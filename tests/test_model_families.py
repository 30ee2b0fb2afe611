"""The family matrix: on every model family Forge supports, tree packing (with each attention
implementation the family has) and padded packing give the per-token logprobs and the loss
gradients of separate forwards, sliding windows, soft-caps, LoRA and split trees included.
CPU paths only; the flex backward (CUDA) is bench/gpu_families.sh's."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from test_tree_exact import make_samples, packed_results, separate_results
from torch.nn.attention.flex_attention import flex_attention

from forge.models.families import FAMILIES, VOCAB, WINDOW, Family, build_lora, matrix_paths, render_readme
from forge.tree import attention, microbatches
from forge.types import Sample

LOGPROB_TOLERANCE = 1e-5
GRADIENT_TOLERANCE = 1e-5


def family_samples(seed: int) -> list[Sample]:
    """Shared prompts, branches at several depths, a duplicate, a prefix of another sample and
    an unrelated one; most are longer than the sliding windows (WINDOW and 2 * WINDOW)."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, VOCAB, (n,), generator=generator).tolist()

    prompt, other = tokens(10), tokens(4)
    branch = prompt + tokens(5)
    sequences = [
        branch + tokens(7),
        branch + tokens(3),
        prompt + tokens(11),
        prompt + other + tokens(6),
        prompt + other,
        branch + tokens(7)[:0],
        tokens(16),
        prompt + tokens(2),
        list(branch),
    ]
    return make_samples(sequences, seed)


def build(family: Family, lora: bool, attn_implementation: str) -> torch.nn.Module:
    return build_lora(family, attn_implementation) if lora else family.build(attn_implementation)


def cases() -> list:
    """(family, lora, packing, attn_implementation) for every CPU path of every family (the
    README table is generated from the same `matrix_paths`)."""
    found = []
    for family in FAMILIES.values():
        first = family.attention_implementations()[0]
        for lora in [False, True] if family.lora else [False]:
            for packing, implementation in matrix_paths(family):
                name = f"{family.name}{'-lora' if lora else ''}-{packing}-{implementation}"
                # Padded packing is transformers' own masking: the fast run checks it once per
                # family, on its first implementation, without LoRA.
                slow = packing == "padded" and (lora or implementation != first)
                marks = [pytest.mark.slow] if slow else []
                found.append(pytest.param(family, lora, packing, implementation, id=name, marks=marks))
    return found


def flex_forward_only(family, lora, samples, budget, monkeypatch) -> None:
    """torch 2.13 has no flex attention backward on CPU, nor compiles it there: the flex tree
    path is checked forward-only through eager flex attention (the same BlockMask, the same
    transformers code), its gradients on a GPU."""
    from transformers.integrations import flex_attention as hf_flex

    calls = []

    def eager_flex(query, key, value, *args, training=False, **kwargs):
        calls.append(kwargs.get("block_mask"))
        return flex_attention(query, key, value, *args, **kwargs)

    monkeypatch.setattr(hf_flex, "compile_friendly_flex_attention", eager_flex)
    reference, model = build(family, lora, "eager"), build(family, lora, "flex_attention")
    with torch.no_grad():
        expected, _, _ = separate_results_no_grad(reference, samples)
        for batch in microbatches(samples, "tree", budget, attention="flex"):
            for index, got in zip(batch.sample_indices, batch.forward_logprobs(model), strict=True):
                assert (got - expected[index]).abs().max().item() <= LOGPROB_TOLERANCE
    assert calls and all(mask is not None for mask in calls)


def separate_results_no_grad(model, samples):
    logprobs = []
    for s in samples:
        ids = torch.tensor([s.token_ids])
        logits = model(input_ids=ids).logits[0, :-1]
        logprobs.append(logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0])
    return logprobs, None, None


@functools.cache
def reference(name: str, lora: bool, implementation: str):
    """Separate forwards' logprobs and gradients (shared by the packings and budgets)."""
    family = FAMILIES[name]
    return separate_results(build(family, lora, implementation), family_samples(seed=len(name)))


@pytest.fixture
def small_query_blocks(monkeypatch):
    # Tiny query blocks, so the block-sparse SDPA path splits these short trees into many.
    monkeypatch.setattr(attention, "QUERY_BLOCK", 5)


@pytest.mark.parametrize(
    "budget", [24, pytest.param(200, marks=pytest.mark.slow)], ids=["split-trees", "one-tree"]
)
@pytest.mark.parametrize(("family", "lora", "packing", "implementation"), cases())
def test_family_path_equals_separate_forwards(
    family, lora, packing, implementation, budget, small_query_blocks, monkeypatch
):
    samples = family_samples(seed=len(family.name))
    if implementation == "flex_attention":
        flex_forward_only(family, lora, samples, budget, monkeypatch)
        return
    expected_logprobs, expected_grad, scale = reference(family.name, lora, implementation)
    logprobs, grad = packed_results(build(family, lora, implementation), samples, packing, budget)
    for got, want in zip(logprobs, expected_logprobs, strict=True):
        assert got.shape == want.shape
        if len(want):
            assert (got - want).abs().max().item() <= LOGPROB_TOLERANCE
    assert ((grad - expected_grad).norm() / scale).item() <= GRADIENT_TOLERANCE


WINDOWED = [
    f for f in FAMILIES.values() if f.config.get("sliding_window") or f.config.get("attention_chunk_size")
]


@pytest.mark.parametrize("family", WINDOWED, ids=[f.name for f in WINDOWED])
def test_the_matrix_sequences_reach_past_every_window(family):
    """Without its window or chunk (and soft-cap) a windowed family's logprobs move far beyond
    the tolerance on these samples: the matrix would catch a tree path that ignored them."""
    samples = family_samples(seed=len(family.name))
    model = family.build("eager")
    unbounded = Family(
        family.name,
        family.config_class,
        family.model_class,
        {
            **family.config,
            **{key: 10_000 for key in ("sliding_window", "attention_chunk_size") if family.config.get(key)},
            "attn_logit_softcapping": None,
        },
    ).build("eager")
    with torch.no_grad():
        windowed, _, _ = separate_results_no_grad(model, samples)
        plain, _, _ = separate_results_no_grad(unbounded, samples)
    assert max(len(s.token_ids) for s in samples) > WINDOW + 1
    assert max((a - b).abs().max().item() for a, b in zip(windowed, plain, strict=True) if len(a)) > 1e-3


def test_moe_forwards_leave_the_router_aux_loss_out():
    """Forge trains the policy loss alone: its forwards of a mixture-of-experts model compute
    no router logits nor load-balancing loss, even where the config asks for them (that loss
    depends on which tokens a forward holds, so tree, padded and separate forwards would
    disagree on it). The matrix checks the gradients; this checks the forwards."""
    family = FAMILIES["qwen3_moe"]
    model = family.build("sdpa")
    assert model.config.output_router_logits and model.config.router_aux_loss_coef > 0
    outputs = []
    model.register_forward_hook(lambda module, args, output: outputs.append(output))
    samples = family_samples(seed=0)
    for packing in ["tree", "padded"]:
        for batch in microbatches(samples, packing, 64):
            batch.forward_logprobs(model)
    assert outputs and all(o.aux_loss is None and o.router_logits is None for o in outputs)
    assert model(input_ids=torch.tensor([samples[0].token_ids])).aux_loss is not None  # what it would do


def test_readme_family_table_is_generated_from_this_matrix():
    readme = Path(__file__).resolve().parent.parent / "README.md"
    current = readme.read_text()
    assert render_readme(current) == current, (
        "README.md family table is stale: run python -m forge.models.families"
    )
