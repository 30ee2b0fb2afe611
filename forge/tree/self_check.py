"""The tree path checked against separate forwards through a loaded model, before training on it.

For families nobody has tested: a model whose code drops Forge's tree keyword, masks by sequence
index instead of position, or attends in a way the tree rule does not reproduce disagrees here
on a few short random sequences, instead of training on wrong gradients. Sliding windows the
model declares are shrunk for the check (and restored), so short sequences reach past them;
a window longer than the longest sequence the trainer takes never binds, so it is left
as declared (PhiMoE's 131072, which it applies in its mask alone, then trains on the tree).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from forge.tree.agreement import Look, agreement, is_low_precision
from forge.tree.microbatch import Attention, microbatches
from forge.types import Sample

CHECK_WINDOW = 4  # the sliding window every windowed layer gets during the check


@dataclass
class CheckResult:
    """`error` is what was held to `tolerance` (forge.tree.agreement: in low precision, the
    largest difference past the few largest); `max_error` the largest difference."""

    ok: bool
    max_error: float
    tolerance: float
    seconds: float
    reason: str = ""
    error: float = 0.0


def check_sequences(vocab_size: int, seed: int = 0) -> list[list[int]]:
    """Shared prefixes, branches at several depths, a prefix of another and an unrelated
    sequence; the longest is over 4 windows of CHECK_WINDOW long."""
    generator = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(0, vocab_size, (n,), generator=generator).tolist()

    prompt, branch = tokens(7), tokens(6)
    return [
        prompt + branch + tokens(5),
        prompt + branch + tokens(3),
        prompt + tokens(9),
        prompt + branch,
        tokens(10),
    ]


@contextlib.contextmanager
def shrunk_windows(model: torch.nn.Module, window: int, longest: int | None = None) -> Iterator[bool]:
    """Every sliding window the model declares (config and attention modules) set to at most
    `window`, restored on exit, except those longer than `longest`: no sequence of at most
    `longest` tokens reaches past them (a query sees keys fewer than `window` positions back;
    one more than needed, for a family that counts its window one further), so they cannot
    change a result. Yields whether any was shrunk."""
    saved: list[tuple[object, str, int]] = []
    owners = [model.config, *model.modules()]
    for owner in owners:
        for name in ("sliding_window", "attention_chunk_size"):  # Llama 4's chunks, as windows
            value = getattr(owner, name, None)
            if (
                isinstance(value, int)
                and not isinstance(value, bool)
                and value > window
                and (longest is None or value <= longest)
            ):
                saved.append((owner, name, value))
    try:
        for owner, name, _ in saved:
            setattr(owner, name, window)
        yield bool(saved)
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _sample(tokens: list[int]) -> Sample:
    n = len(tokens)
    return Sample(tokens, [1] * n, [0.0] * n, [0] * n, advantage=1.0)


def _separate(model: torch.nn.Module, sequences: list[list[int]], device: torch.device) -> list[torch.Tensor]:
    out = []
    for tokens in sequences:
        ids = torch.tensor([tokens], device=device)
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
        out.append(logits.log_softmax(-1).gather(1, ids[0, 1:, None])[:, 0])
    return out


def packed_logprobs(
    model: torch.nn.Module, sequences: list[list[int]], packing: str, attention: Attention = "auto"
) -> list[torch.Tensor]:
    """Per sequence its logprobs (fp32, element t of token t+1), through `packing` in one micro-batch."""
    samples = [_sample(s) for s in sequences]
    out: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    budget = sum(len(s) for s in sequences)
    for batch in microbatches(samples, packing, budget, attention):
        for index, logprobs in zip(batch.sample_indices, batch.forward_logprobs(model), strict=True):
            out[index] = logprobs.float()
    return out


def position_errors(
    sequences: list[list[int]], got: list[torch.Tensor], want: list[torch.Tensor]
) -> list[float]:
    """The absolute logprob difference at each distinct position: one that several sequences
    share (the same tokens up to its target) is computed once by the tree, so it counts once,
    by its largest difference (a rounding flip there would otherwise count once per sequence)."""
    errors: dict[tuple[int, ...], float] = {}
    for tokens, g, w in zip(sequences, got, want, strict=True):
        for t, error in enumerate((g - w).abs().tolist()):
            key = tuple(tokens[: t + 2])
            errors[key] = max(errors.get(key, 0.0), error)
    return list(errors.values())


class _TreeFailed(Exception):
    """The tree forward itself raised: the finding, not a fault of the check."""


def check_tree_path(
    model: torch.nn.Module,
    attention: Attention = "auto",
    seed: int = 0,
    longest: int | None = None,
    both_looks: bool = False,
) -> CheckResult:
    """Compare the tree path's logprobs with separate forwards of `check_sequences` through
    `model` as loaded (its attention implementation and dtype), in eval mode without grad.

    `longest`: the most tokens a sequence trained on the tree path may have (the trainer's
    trainer.max_tokens_per_microbatch, which `microbatches` enforces); windows longer than that
    are checked as declared, not shrunk. None: every window is shrunk. In low precision, the
    rule of forge.tree.agreement (a second look uses seed + 1; `both_looks`: always, as
    processes of one data-parallel trainer must all run the same forwards)."""
    started = time.perf_counter()
    embeddings = model.get_input_embeddings().weight
    vocab_size = int(model.config.vocab_size)
    low_precision = is_low_precision(embeddings.dtype)

    def look(index: int) -> Look:
        sequences = check_sequences(vocab_size, seed + index)
        want = _separate(model, sequences, embeddings.device)
        noise = None
        if low_precision:
            # Two exact computations of the same logprobs: how far this dtype alone moves them.
            padded = packed_logprobs(model, sequences, "padded", attention)
            noise = position_errors(sequences, padded, want)
        try:
            got = packed_logprobs(model, sequences, "tree", attention)
        except Exception as error:  # noqa: BLE001 - any failure of the tree path is the finding
            raise _TreeFailed(str(error)) from error
        return position_errors(sequences, got, want), noise

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), shrunk_windows(model, CHECK_WINDOW, longest):
            verdict = agreement(look, embeddings.dtype, both_looks)
    except _TreeFailed as failure:
        return CheckResult(
            False,
            float("inf"),
            float("nan"),
            time.perf_counter() - started,
            f"the tree forward failed: {failure}",
            float("inf"),
        )
    finally:
        model.train(was_training)
    seconds = time.perf_counter() - started
    if not verdict.ok:
        return CheckResult(
            False,
            verdict.largest,
            verdict.tolerance,
            seconds,
            f"{verdict.describe('logprob difference')} on {len(check_sequences(vocab_size))} random sequences",
            verdict.error,
        )
    return CheckResult(True, verdict.largest, verdict.tolerance, seconds, error=verdict.error)
