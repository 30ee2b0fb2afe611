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

from forge.tree.microbatch import Attention, microbatches
from forge.types import Sample

CHECK_WINDOW = 4  # the sliding window every windowed layer gets during the check
# Largest logprob disagreement accepted in fp32 (exact paths agree to ~1e-6). In lower
# precision: NOISE_FACTOR times the rounding noise between two exact computations (separate
# forwards and a padded batch of the same sequences), and at least EPS_FACTOR units of the
# dtype's rounding (two exact computations may round alike on one model and not on another).
FP32_TOLERANCE = 1e-4
NOISE_FACTOR = 4.0
EPS_FACTOR = 4.0


@dataclass
class CheckResult:
    ok: bool
    max_error: float
    tolerance: float
    seconds: float
    reason: str = ""


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


def _packed(model: torch.nn.Module, sequences: list[list[int]], packing: str, attention: Attention):
    samples = [_sample(s) for s in sequences]
    out: list[torch.Tensor] = [torch.empty(0)] * len(samples)
    budget = sum(len(s) for s in sequences)
    for batch in microbatches(samples, packing, budget, attention):
        for index, logprobs in zip(batch.sample_indices, batch.forward_logprobs(model), strict=True):
            out[index] = logprobs.float()
    return out


def _max_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max((g - w).abs().max().item() for g, w in zip(got, want, strict=True) if len(w))


def check_tree_path(
    model: torch.nn.Module, attention: Attention = "auto", seed: int = 0, longest: int | None = None
) -> CheckResult:
    """Compare the tree path's logprobs with separate forwards of `check_sequences` through
    `model` as loaded (its attention implementation and dtype), in eval mode without grad.

    `longest`: the most tokens a sequence trained on the tree path may have (the trainer's
    trainer.max_tokens_per_microbatch, which `microbatches` enforces); windows longer than that
    are checked as declared, not shrunk. None: every window is shrunk."""
    started = time.perf_counter()
    embeddings = model.get_input_embeddings().weight
    sequences = check_sequences(int(model.config.vocab_size), seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), shrunk_windows(model, CHECK_WINDOW, longest):
            want = _separate(model, sequences, embeddings.device)
            tolerance = FP32_TOLERANCE
            if embeddings.dtype != torch.float32:
                noise = _max_error(_packed(model, sequences, "padded", attention), want)
                tolerance = max(EPS_FACTOR * torch.finfo(embeddings.dtype).eps, NOISE_FACTOR * noise)
            try:
                got = _packed(model, sequences, "tree", attention)
            except Exception as error:  # noqa: BLE001 - any failure of the tree path is the finding
                return CheckResult(
                    False,
                    float("inf"),
                    tolerance,
                    time.perf_counter() - started,
                    f"the tree forward failed: {error}",
                )
    finally:
        model.train(was_training)
    error = _max_error(got, want)
    seconds = time.perf_counter() - started
    if error > tolerance:
        return CheckResult(
            False,
            error,
            tolerance,
            seconds,
            f"largest logprob difference {error:.3g} > {tolerance:.3g} on {len(sequences)} random sequences",
        )
    return CheckResult(True, error, tolerance, seconds)
