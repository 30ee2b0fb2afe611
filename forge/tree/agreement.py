"""Whether per-token logprobs of a path under test agree with a reference, to within the rounding
of the dtype they ran in: the rule the trainer's and the rollout engine's self-checks share.

In fp32 the paths are exact, so any token off by more than FP32_TOLERANCE is a defect. In bf16 /
fp16 two correct computations of the same logprobs differ (a batch laid out differently rounds
differently), so the path is held to NOISE_FACTOR times what such a pair differs by, measured in
the same check and dtype, and at least to EPS_FACTOR units of the dtype's rounding. A plain
largest error is a poor statistic there: a near-tied choice (a mixture-of-experts router's
top-k) flips under rounding and moves one token by up to ~0.3, a false alarm in the path, or in
the exact pair a tolerance wide enough to let defects through. So the OUTLIERS largest errors
of each are set aside and the next largest compared. Where any were set aside, the check looks
again on fresh random tokens and holds both looks together to the same count: a flip rarely
comes back, while a defect (a wrong mask, window, position rule, ALiBi across pad holes) does,
even one that moves few tokens (ALiBi across the engine's pad holes moved 1 to 5 of its 24).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

FP32_TOLERANCE = 1e-4  # exact paths agree to ~1e-6 in fp32
OUTLIERS = 2  # errors set aside in low precision (near-tie flips are isolated and rare)
# Measured on the family matrix's tiny models (CPU, 20 seeds each, bf16 and fp16): the tree
# path's statistic stayed within 0.58 of the tolerance, the engine's within 0.89 (fp16, where its
# batched decode rounds more than any exact pair: the eps floor decides there). With lm_head
# weights x10 the tree's noise grew ~15x in bf16 and the padded pair's with it.
NOISE_FACTOR = 4.0
EPS_FACTOR = 4.0  # units of the dtype's eps: two exact computations may round alike (noise 0)

# One look: per distinct token of the path under test its absolute logprob difference from the
# reference, and (low precision) the same between two exact computations of those tokens.
Look = tuple[list[float], list[float] | None]


@dataclass(frozen=True)
class Agreement:
    """`error`: the statistic held to `tolerance` (the largest difference in fp32; past the
    OUTLIERS largest in low precision); `largest`: the largest, outliers included; `looks`:
    how many times the check ran (2 where outliers were set aside)."""

    ok: bool
    error: float
    tolerance: float
    largest: float
    low_precision: bool
    looks: int = 1

    def describe(self, what: str) -> str:
        """`what` (e.g. 'logprob difference') and the numbers, for a failed check's message."""
        if not self.low_precision:
            return f"largest {what} {self.error:.3g} > {self.tolerance:.3g}"
        return (
            f"{what} {self.error:.3g} past the {OUTLIERS} largest (largest {self.largest:.3g}; "
            f"{self.looks} look{'s' if self.looks > 1 else ''}) > {self.tolerance:.3g} ({NOISE_FACTOR:g}x "
            f"the difference between two exact computations in this dtype, at least {EPS_FACTOR:g} eps)"
        )


def is_low_precision(dtype: torch.dtype) -> bool:
    """Whether `dtype` rounds too coarsely for FP32_TOLERANCE (bf16, fp16, fp8)."""
    return dtype.is_floating_point and torch.finfo(dtype).eps > torch.finfo(torch.float32).eps


def _past_outliers(values: Sequence[float]) -> float:
    ordered = sorted(values, reverse=True)
    return ordered[OUTLIERS] if len(ordered) > OUTLIERS else 0.0


def judge(errors: Sequence[float], noise: Sequence[float] | None, dtype: torch.dtype) -> Agreement:
    """One look's verdict: `errors` (per distinct token, path under test against the reference)
    computed in `dtype`; `noise` (two exact computations of the same tokens, low precision only)."""
    largest = max(errors, default=0.0)
    if not is_low_precision(dtype):
        return Agreement(largest <= FP32_TOLERANCE, largest, FP32_TOLERANCE, largest, False)
    if noise is None:
        raise ValueError(f"agreement in {dtype} needs the noise between two exact computations")
    tolerance = max(NOISE_FACTOR * _past_outliers(noise), EPS_FACTOR * torch.finfo(dtype).eps)
    error = _past_outliers(errors)
    return Agreement(error <= tolerance, error, tolerance, largest, True)


def agreement(look: Callable[[int], Look], dtype: torch.dtype, both_looks: bool = False) -> Agreement:
    """The verdict on a check whose `look(i)` runs it on the i-th set of random tokens: one look,
    or in low precision a second where the first set outliers aside, both held together.
    `both_looks`: in low precision always the two, so that processes which must run the same
    forwards (FSDP gathers each layer's shards with the others) do, whatever their own noise."""
    errors, noise = look(0)
    first = judge(errors, noise, dtype)
    if not first.low_precision:
        return first
    if not both_looks and (not first.ok or first.largest <= first.tolerance):
        return first
    more_errors, more_noise = look(1)
    both = judge([*errors, *more_errors], [*(noise or []), *(more_noise or [])], dtype)
    return Agreement(both.ok, both.error, both.tolerance, both.largest, True, looks=2)
