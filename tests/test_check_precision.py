"""The self-checks in bf16 and fp16, what every GPU user trains in (forge.tree.agreement).

The path under test is held to a multiple of what two exact computations differ by in the same
check and dtype, with the few largest errors of each set aside: a mixture-of-experts router's
near-tied choice that flips under rounding moves one token, not a false alarm, while the defects
the checks exist for (a dropped tree keyword, a window applied by mask alone, attention scaled by
sequence index, ALiBi counted over pad holes) move many tokens and are still caught. fp32 keeps
its 1e-4 on every token.
"""

from __future__ import annotations

import pytest
import torch
from test_off_matrix_families import build as build_off_matrix
from test_self_check import odd_model
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.llama.modeling_llama import LlamaAttention
from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

from forge.models.families import FAMILIES
from forge.rollout.engines.hf import HFEngine
from forge.tree.agreement import EPS_FACTOR, FP32_TOLERANCE, NOISE_FACTOR, agreement, judge
from forge.tree.self_check import check_tree_path

LOW = [torch.bfloat16, torch.float16]
LOW_IDS = ["bf16", "fp16"]
FP16_EPS = torch.finfo(torch.float16).eps


# The rule itself


def test_fp32_holds_every_token_to_the_fixed_tolerance():
    assert judge([1e-6] * 50, None, torch.float32).ok
    one_off = judge([1e-6] * 49 + [2 * FP32_TOLERANCE], None, torch.float32)
    assert not one_off.ok and one_off.error == one_off.largest == 2 * FP32_TOLERANCE


def test_low_precision_sets_isolated_flips_aside():
    """Two tokens far off (a router's top-k flipping, as mixtral's did by 0.27 in fp16) on an
    otherwise agreeing look pass it; a third does not."""
    noise = [0.002] * 50
    assert judge([0.002] * 48 + [0.27, 0.1], noise, torch.float16).ok
    assert not judge([0.002] * 47 + [0.27, 0.1, 0.05], noise, torch.float16).ok


def test_low_precision_tolerance_follows_the_measured_noise():
    """NOISE_FACTOR times the noise past its own outliers (a flip in the reference pair does
    not widen it), never below EPS_FACTOR units of the dtype's rounding."""
    noisy = judge([0.0], [0.01] * 10 + [0.5, 0.4], torch.float16)
    assert noisy.tolerance == pytest.approx(NOISE_FACTOR * 0.01)
    exact = judge([0.0], [0.0] * 12, torch.bfloat16)
    assert exact.tolerance == EPS_FACTOR * torch.finfo(torch.bfloat16).eps
    errors = [3 * 0.01] * 12  # within 4x the noise of 0.01, not within the floor alone
    assert judge(errors, [0.01] * 12, torch.float16).ok
    assert not judge(errors, [0.0] * 12, torch.float16).ok


def test_low_precision_needs_the_noise_measured():
    with pytest.raises(ValueError, match="noise"):
        judge([0.0], None, torch.bfloat16)


def looks(*runs):
    """A check's look(i) returning runs[i], counting the looks taken."""
    taken = []

    def look(index):
        taken.append(index)
        return runs[index]

    return look, taken


def test_a_second_look_settles_what_the_first_set_aside():
    """A flip does not come back on fresh tokens; a defect that moved few tokens does."""
    quiet, flip = [0.002] * 24, [0.002] * 23 + [0.3]
    look, taken = looks((flip, quiet), (quiet, quiet))
    assert agreement(look, torch.bfloat16).ok and taken == [0, 1]
    look, taken = looks((flip, quiet), ([0.002] * 22 + [0.2, 0.1], quiet))
    verdict = agreement(look, torch.bfloat16)
    assert not verdict.ok and verdict.looks == 2 and "2 looks" in verdict.describe("difference")


def test_no_second_look_where_the_first_settles_it():
    for first in ([0.002] * 24, [0.002] * 21 + [0.3] * 3):
        look, taken = looks((first, [0.002] * 24))
        agreement(look, torch.bfloat16)
        assert taken == [0]
    look, taken = looks(([0.0] * 23 + [2e-4], None))
    assert not agreement(look, torch.float32).ok and taken == [0]  # fp32: one token decides


def test_processes_that_must_run_the_same_forwards_always_take_both_looks():
    """Under FSDP each forward gathers shards with the other processes: a look one process takes
    and another skips (its own first look settled it) would hang them both."""
    look, taken = looks(([0.002] * 24, [0.002] * 24), ([0.002] * 24, [0.002] * 24))
    verdict = agreement(look, torch.bfloat16, both_looks=True)
    assert verdict.ok and verdict.looks == 2 and taken == [0, 1]
    look, taken = looks(([0.0] * 24, None))
    assert agreement(look, torch.float32, both_looks=True).ok and taken == [0]  # fp32: one look decides


# The trainer's tree self-check


class SlightlyIndexScaledAttention(LlamaAttention):
    """Attention output scaled by 1 + index / 100 by sequence index: a subtle defect (the tree's
    largest logprob error 0.16-0.25 in fp32, spread over many tokens), unlike the O(1) ones."""

    def forward(self, hidden_states, *args, **kwargs):
        output, weights = super().forward(hidden_states, *args, **kwargs)
        index = torch.arange(output.shape[1], dtype=output.dtype, device=output.device)
        return output * (1 + index / 100)[None, :, None], weights


def slightly_scaled_llama(seed: int) -> torch.nn.Module:
    model = FAMILIES["llama"].build("sdpa", seed=seed)
    model.model.layers[0].self_attn.__class__ = SlightlyIndexScaledAttention
    return model


DEFECTS = {
    "keyword-dropped-on-one-layer": lambda: odd_model("drop", 1),
    "scaled-by-sequence-index": lambda: odd_model("scale"),
    "window-by-mask-alone": lambda: build_off_matrix("phimoe"),  # PhiMoE: a MoE too
    "slightly-scaled-by-index": lambda: slightly_scaled_llama(0),
}


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("defect", list(DEFECTS))
def test_the_tree_self_check_still_catches_defects_in_low_precision(defect, dtype):
    result = check_tree_path(DEFECTS[defect]().to(dtype))
    assert not result.ok
    assert "logprob difference" in result.reason and "past the 2 largest" in result.reason


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_a_near_tie_flip_in_a_mixture_of_experts_is_no_false_alarm(dtype):
    """Mixtral seed 22: in fp16 one token's experts flip (0.27 off; the old largest-error rule
    allowed 0.012 and fell back to padded); the rest agree to rounding."""
    result = check_tree_path(FAMILIES["mixtral"].build("sdpa", seed=22).to(dtype), seed=22)
    assert result.ok, result.reason
    assert result.error <= result.tolerance < 0.1


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "llama", "qwen2", "mistral"])
def test_the_tree_self_check_passes_exact_families_over_20_seeds_in_low_precision(name, dtype):
    failed = []
    for seed in range(20):
        result = check_tree_path(FAMILIES[name].build("sdpa", seed=seed).to(dtype), seed=seed)
        if not result.ok:
            failed.append((seed, result.reason))
    assert not failed


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_the_tree_self_check_catches_a_subtle_defect_over_20_seeds_in_low_precision(dtype):
    assert all(not check_tree_path(slightly_scaled_llama(seed).to(dtype)).ok for seed in range(20))


# The rollout engine's check


def mpt(seed: int = 0, alibi_bias_max: int = 8) -> torch.nn.Module:
    """A tiny MPT: ALiBi counted by cache column, so a pad hole in a row lengthens every distance
    across it (the engine's ragged turns): 0.1-0.4 off in fp32. `alibi_bias_max` above 8 flattens
    the slopes (transformers ignores the config's), a subtler defect."""
    config = AutoConfig.for_model(
        "mpt",
        d_model=32,
        n_heads=4,
        n_layers=2,
        vocab_size=64,
        max_seq_len=128,
        pad_token_id=0,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()

    def alibi(num_heads, sequence_length, alibi_bias_max_=8, device=None):
        return build_mpt_alibi_tensor(num_heads, sequence_length, alibi_bias_max, device)

    model.transformer.build_mpt_alibi_tensor = alibi
    return model


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_the_engine_check_refuses_alibi_over_pad_holes_in_low_precision(dtype):
    with pytest.raises(ValueError, match="past the 2 largest.*rollout.engine: remote"):
        HFEngine(mpt().to(dtype), [1], pad_token_id=0)


@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral"])
def test_the_engine_check_passes_mixtures_of_experts_in_low_precision(name, dtype):
    engine = HFEngine(FAMILIES[name].build("sdpa").to(dtype), [1], pad_token_id=0)
    assert engine.share_prompt == (name == "qwen3_moe")  # mixtral slides: its prompt is copied


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
@pytest.mark.parametrize("name", ["qwen3_moe", "mixtral", "llama", "gemma2"])
def test_the_engine_check_passes_exact_families_over_20_seeds_in_low_precision(name, dtype):
    family = FAMILIES[name]
    failed = []
    for seed in range(20):
        try:
            HFEngine(family.build(family.attention_implementations()[0], seed).to(dtype), [1], 0, seed=seed)
        except ValueError as error:
            failed.append((seed, str(error)))
    assert not failed


@pytest.mark.slow
@pytest.mark.parametrize("dtype", LOW, ids=LOW_IDS)
def test_the_engine_check_refuses_alibi_over_pad_holes_over_20_seeds_in_low_precision(dtype):
    passed = []
    for seed in range(20):
        try:
            HFEngine(mpt(seed).to(dtype), [1], pad_token_id=0)
            passed.append(seed)
        except ValueError:
            pass
    assert not passed
