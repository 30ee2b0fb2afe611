"""Policy losses: pure functions of named, shape-annotated tensors, in one registry.

Shapes: B sequences, T token positions (padded). Every loss takes
    logprobs            [B, T]  the trainer's logprobs of the sampled tokens (with grad)
    behaviour_logprobs  [B, T]  the logprobs the inference engine sampled them with
    advantages          [B]     one advantage per sequence
    loss_mask           [B, T]  1 on generated tokens, 0 on prompt, observations, padding
    config              LossConfig, the knobs
    ref_logprobs        [B, T]  optional frozen reference policy (for `kl_coef`)
and returns `(per_token_loss [B, T], metrics)`, zero where `loss_mask` is 0. Reduce the
per-token loss with `aggregate_loss`. No model, no optimizer, no Ray in here.

`compute_loss` adds the optional entropy bonus to whichever loss it runs: given
`entropy [B, T]` (the policy's entropy at each position, with grad) and `entropy_coef`,
the per-token loss becomes loss - entropy_coef * entropy on the trained tokens.

`tis_cap` (truncated importance sampling) bounds every token's importance weight
pi_trainer / pi_behaviour at the cap, whichever loss it is used with: for `pg` it turns
on the weight min(ratio, cap) (stop-gradient); for the ratio losses it caps the ratio.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

AGGREGATION_MODES = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")


@dataclass(frozen=True)
class LossConfig:
    """Knobs of the loss family; each loss reads the few it needs."""

    clip_low: float = 0.2  # ppo_clip: ratio clipped to [1 - clip_low, 1 + clip_high]
    clip_high: float = 0.28  # DAPO's clip-higher: room for low-probability tokens to grow
    gspo_clip_low: float = 3e-4  # gspo clips the sequence ratio, which sits much closer to 1
    gspo_clip_high: float = 4e-4
    cispo_clip_low: float = 0.0  # cispo: IS weight clipped to [low, high]; MiniMax-M1 sets
    cispo_clip_high: float = 5.0  # no effective lower bound and tunes only the upper one
    tis_cap: float | None = None  # truncated importance sampling; None disables
    kl_coef: float = 0.0  # weight of the k3 KL to `ref_logprobs`; 0 disables
    entropy_coef: float = 0.0  # weight of the entropy bonus (needs `entropy`); 0 disables

    def __post_init__(self) -> None:
        for name in (
            "clip_low", "clip_high", "gspo_clip_low", "gspo_clip_high", "cispo_clip_low", "kl_coef", "entropy_coef"
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"LossConfig.{name}={getattr(self, name)} must be >= 0")
        if self.cispo_clip_high <= self.cispo_clip_low:
            raise ValueError("LossConfig.cispo_clip_high must be above cispo_clip_low")
        if self.tis_cap is not None and self.tis_cap <= 0:
            raise ValueError(f"LossConfig.tis_cap={self.tis_cap} must be > 0 (or None to disable)")


LossOutput = tuple[Tensor, dict[str, float]]
LossFn = Callable[..., LossOutput]
LOSSES: dict[str, LossFn] = {}
# Losses that are exactly 0, with a zero gradient, on every token of a sequence whose
# advantage is 0 (when kl_coef and entropy_coef are 0 too): the trainer may leave such
# sequences out of the forward and backward (`train.skip_zero_advantage`).
VANISH_AT_ZERO_ADVANTAGE: set[str] = set()


def register_loss(name: str, *, vanishes_at_zero_advantage: bool = False) -> Callable[[LossFn], LossFn]:
    """Add a loss to the registry. Declare `vanishes_at_zero_advantage` only if the loss
    (before the KL and entropy terms) is a multiple of each sequence's advantage."""

    def wrap(fn: LossFn) -> LossFn:
        if name in LOSSES:
            raise ValueError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        if vanishes_at_zero_advantage:
            VANISH_AT_ZERO_ADVANTAGE.add(name)
        return fn

    return wrap


def get_loss(name: str) -> LossFn:
    try:
        return LOSSES[name]
    except KeyError:
        raise ValueError(
            f"unknown loss {name!r}: set train.loss to one of {', '.join(sorted(LOSSES))}"
        ) from None


def compute_loss(
    name: str,
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    config: LossConfig,
    ref_logprobs: Tensor | None = None,
    entropy: Tensor | None = None,
) -> LossOutput:
    """Look up `name` in the registry and apply it, then the entropy bonus; see the module
    docstring for shapes."""
    if logprobs.shape != behaviour_logprobs.shape or logprobs.shape != loss_mask.shape:
        raise ValueError(
            f"logprobs {tuple(logprobs.shape)}, behaviour_logprobs {tuple(behaviour_logprobs.shape)} "
            f"and loss_mask {tuple(loss_mask.shape)} must all be [B, T]"
        )
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages {tuple(advantages.shape)} must be [B] = [{logprobs.shape[0]}]")
    if config.kl_coef > 0 and ref_logprobs is None:
        raise ValueError("kl_coef > 0 needs ref_logprobs (the frozen reference policy's logprobs)")
    if config.entropy_coef > 0 and entropy is None:
        raise ValueError("entropy_coef > 0 needs entropy (the policy's per-token entropy, with grad)")
    if entropy is not None and entropy.shape != logprobs.shape:
        raise ValueError(f"entropy {tuple(entropy.shape)} must be [B, T] = {tuple(logprobs.shape)}")
    per_token_loss, metrics = get_loss(name)(
        logprobs, behaviour_logprobs, advantages, loss_mask, config, ref_logprobs
    )
    if entropy is not None:
        metrics["entropy"] = _masked_mean(entropy.detach(), loss_mask)
        if config.entropy_coef > 0:
            per_token_loss = per_token_loss - config.entropy_coef * entropy * loss_mask
    return per_token_loss, metrics


# ---------------------------------------------------------------- shared pieces


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    count = mask.sum()
    if count == 0:
        return 0.0
    return float((values * mask).sum() / count)


def _k3(log_ratio: Tensor) -> Tensor:
    """k3 estimator of KL(p || q) from log(q/p) at samples of p: exp(x) - x - 1 >= 0."""
    return torch.exp(log_ratio) - log_ratio - 1.0


def _finish(
    per_token_loss: Tensor,
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    mask: Tensor,
    config: LossConfig,
    ref_logprobs: Tensor | None,
    metrics: dict[str, float],
) -> LossOutput:
    """Add the optional reference KL, zero the masked positions, add the shared metrics."""
    log_ratio = (logprobs - behaviour_logprobs).detach()
    metrics["mismatch_kl"] = _masked_mean(_k3(log_ratio), mask)
    metrics["importance_ratio_mean"] = _masked_mean(torch.exp(log_ratio), mask)
    if ref_logprobs is not None:
        ref_kl = _k3(ref_logprobs.detach() - logprobs)
        metrics["ref_kl"] = _masked_mean(ref_kl.detach(), mask)
        if config.kl_coef > 0:
            per_token_loss = per_token_loss + config.kl_coef * ref_kl
    per_token_loss = per_token_loss * mask
    metrics["policy_loss"] = _masked_mean(per_token_loss.detach(), mask)
    return per_token_loss, metrics


def _clipped_surrogate(
    ratio: Tensor, advantages: Tensor, low: float, high: float, tis_cap: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """-min(r A, clip(r) A), with r capped at `tis_cap` for negative advantages (where the
    PPO clip leaves it unbounded). Returns the loss and where the clip / the cap bit."""
    clipped = torch.clamp(ratio, 1.0 - low, 1.0 + high)
    loss = -torch.minimum(ratio * advantages, clipped * advantages)
    clip_hit = (ratio * advantages) != torch.minimum(ratio * advantages, clipped * advantages)
    cap_hit = torch.zeros_like(clip_hit)
    if tis_cap is not None:
        capped = -tis_cap * advantages
        cap_hit = (advantages < 0) & (loss > capped)
        loss = torch.where(cap_hit, capped.expand_as(loss), loss)
    return loss, clip_hit, cap_hit


# ---------------------------------------------------------------- the losses


@register_loss("pg", vanishes_at_zero_advantage=True)
def pg(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    config: LossConfig,
    ref_logprobs: Tensor | None = None,
) -> LossOutput:
    """-A * logprob: on-policy REINFORCE / GRPO. With `tis_cap`, each token is weighted by
    the stop-gradient importance weight min(pi / mu, tis_cap)."""
    mask = loss_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None]
    metrics: dict[str, float] = {}
    weight = torch.ones_like(logprobs)
    if config.tis_cap is not None:
        ratio = torch.exp((logprobs - behaviour_logprobs).detach())
        weight = torch.clamp(ratio, max=config.tis_cap)
        metrics["tis_fraction"] = _masked_mean((ratio > config.tis_cap).to(mask.dtype), mask)
    loss = -weight * adv * logprobs
    return _finish(loss, logprobs, behaviour_logprobs, mask, config, ref_logprobs, metrics)


@register_loss("ppo_clip", vanishes_at_zero_advantage=True)
def ppo_clip(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    config: LossConfig,
    ref_logprobs: Tensor | None = None,
) -> LossOutput:
    """PPO's clipped surrogate on the per-token ratio pi / mu, clip range
    [1 - clip_low, 1 + clip_high]."""
    mask = loss_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None]
    ratio = torch.exp(logprobs - behaviour_logprobs)
    loss, clip_hit, cap_hit = _clipped_surrogate(
        ratio, adv, config.clip_low, config.clip_high, config.tis_cap
    )
    metrics = {"clip_fraction": _masked_mean(clip_hit.to(mask.dtype), mask)}
    if config.tis_cap is not None:
        metrics["tis_fraction"] = _masked_mean(cap_hit.to(mask.dtype), mask)
    return _finish(loss, logprobs, behaviour_logprobs, mask, config, ref_logprobs, metrics)


@register_loss("cispo", vanishes_at_zero_advantage=True)
def cispo(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    config: LossConfig,
    ref_logprobs: Tensor | None = None,
) -> LossOutput:
    """CISPO (MiniMax-M1): -sg(clip(pi / mu)) * A * logprob. Clipping the weight rather
    than the objective keeps a gradient on every token, including clipped ones."""
    mask = loss_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None]
    ratio = torch.exp((logprobs - behaviour_logprobs).detach())
    high = config.cispo_clip_high if config.tis_cap is None else min(config.cispo_clip_high, config.tis_cap)
    weight = torch.clamp(ratio, config.cispo_clip_low, high)
    metrics = {"clip_fraction": _masked_mean((weight != ratio).to(mask.dtype), mask)}
    loss = -weight * adv * logprobs
    return _finish(loss, logprobs, behaviour_logprobs, mask, config, ref_logprobs, metrics)


@register_loss("gspo", vanishes_at_zero_advantage=True)
def gspo(
    logprobs: Tensor,
    behaviour_logprobs: Tensor,
    advantages: Tensor,
    loss_mask: Tensor,
    config: LossConfig,
    ref_logprobs: Tensor | None = None,
) -> LossOutput:
    """GSPO: PPO clipping on the sequence-level ratio s = exp(mean_t log(pi / mu)).

    Written per token as s_t = sg(s) * pi_t / sg(pi_t): its value is s on every token
    and, averaged over the sequence's tokens (seq_mean_token_mean), its gradient is
    exactly that of s. Clipping is decided once per sequence.
    """
    mask = loss_mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype)[:, None]
    lengths = mask.sum(dim=1).clamp(min=1.0)
    seq_log_ratio = ((logprobs - behaviour_logprobs) * mask).sum(dim=1) / lengths
    seq_ratio = torch.exp(seq_log_ratio.detach())[:, None]
    token_ratio = seq_ratio * torch.exp(logprobs - logprobs.detach())
    loss, clip_hit, cap_hit = _clipped_surrogate(
        token_ratio, adv, config.gspo_clip_low, config.gspo_clip_high, config.tis_cap
    )
    has_tokens = mask.sum(dim=1) > 0
    seq_clipped = (clip_hit & (mask > 0)).any(dim=1)
    num_sequences = max(int(has_tokens.sum()), 1)
    metrics = {
        "clip_fraction": float(seq_clipped.sum()) / num_sequences,
        "sequence_ratio_mean": float(seq_ratio[:, 0][has_tokens].sum()) / num_sequences,
    }
    if config.tis_cap is not None:
        metrics["tis_fraction"] = _masked_mean(cap_hit.to(mask.dtype), mask)
    return _finish(loss, logprobs, behaviour_logprobs, mask, config, ref_logprobs, metrics)


# ---------------------------------------------------------------- aggregation


def aggregate_loss(
    per_token_loss: Tensor,
    loss_mask: Tensor,
    mode: str,
    num_tokens_total: int,
    num_sequences_total: int,
) -> Tensor:
    """Reduce `per_token_loss [B, T]` to a scalar for one micro-batch.

    The totals are those of the whole optimizer batch, not of this micro-batch, so the
    sum of this over a batch's micro-batches equals the loss of the batch in one piece,
    and calling backward on each micro-batch accumulates exactly the batch gradient.

    token_mean:           sum of all token losses / generated tokens in the batch
    seq_mean_token_mean:  mean over sequences of each sequence's token mean
    seq_mean_token_sum:   mean over sequences of each sequence's token sum (Dr. GRPO)
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(
            f"unknown loss aggregation {mode!r}: set train.loss_aggregation to one of {', '.join(AGGREGATION_MODES)}"
        )
    mask = loss_mask.to(per_token_loss.dtype)
    masked = per_token_loss * mask
    if mode == "token_mean":
        return masked.sum() / max(num_tokens_total, 1)
    per_sequence = masked.sum(dim=1)
    if mode == "seq_mean_token_mean":
        per_sequence = per_sequence / mask.sum(dim=1).clamp(min=1.0)
    return per_sequence.sum() / max(num_sequences_total, 1)
