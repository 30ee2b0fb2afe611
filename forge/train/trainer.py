"""The trainer: packs samples (prefix tree or padded), computes the policy loss micro-batch
by micro-batch, steps the optimizer and hands out versioned weights. No env, no rollout."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from forge.config import ConfigError, ModelConfig, TrainConfig, TrainerConfig
from forge.disk import naming
from forge.heap import release_free_heap
from forge.train.losses import VANISH_AT_ZERO_ADVANTAGE, LossConfig, aggregate_loss, compute_loss
from forge.train.master_weights import MasterWeightAdamW
from forge.train.policy_mode import policy_forward_noise, policy_mode
from forge.tree import microbatches
from forge.types import Sample


def loss_config(cfg: TrainConfig) -> LossConfig:
    """The loss knobs, read from the `train` keys of the same names."""
    return LossConfig(**{knob.name: getattr(cfg, knob.name) for knob in dataclasses.fields(LossConfig)})


def lr_factor(step: int, warmup: int, total: int, schedule: str, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step `step` (0-based): linear warmup over
    `warmup` steps, then constant or decaying (linear / cosine) to `min_ratio` at step
    `total - 1`, and flat there if a run takes more steps."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(total - 1 - warmup, 1)
    progress = min(max(step - warmup, 0) / span, 1.0)
    if schedule == "linear":
        decay = 1.0 - progress
    elif schedule == "cosine":
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"unknown lr_schedule {schedule!r}: use constant, linear or cosine")
    return min_ratio + (1.0 - min_ratio) * decay


def trainable(sample: Sample) -> bool:
    """Whether a sample has a token to train on (its first token is never predicted)."""
    return len(sample.token_ids) > 1 and any(sample.loss_mask[1:])


def loss_tokens(samples: list[Sample]) -> int:
    """The tokens the loss is taken over (its first token is never predicted)."""
    return sum(sum(s.loss_mask[1:]) for s in samples)


# A micro-batch of this one sample adds nothing to the loss or its gradient (no loss token);
# a data-parallel process runs it to keep step with processes that have more micro-batches.
PADDING_SAMPLE = Sample([0, 0], [0, 0], [0.0, 0.0], [0, 0], advantage=0.0)


def pad_rows(rows: list[torch.Tensor], width: int, value: float = 0.0) -> torch.Tensor:
    out = rows[0].new_full((len(rows), width), value)
    for i, row in enumerate(rows):
        out[i, : row.shape[0]] = row
    return out


def check_trainable_dtype(model_cfg: ModelConfig) -> None:
    """Refuse to train all weights in float16: AdamW keeps its state in the weights' dtype, where
    a gradient below ~2e-4 squares to 0 and the update divides by it (a tiny model's weights moved
    by hundreds in 3 steps at learning rate 1e-3; torch's unfused AdamW turns them to NaN). LoRA
    adapters are float32 whatever the base model's dtype (peft), so they train."""
    if model_cfg.dtype == "float16" and not model_cfg.lora.enabled:
        raise ConfigError(
            "model.dtype=float16 trains float16 weights with AdamW, whose state underflows in float16 (a "
            "gradient below ~2e-4 squares to 0 and the update divides by it: a tiny model's weights moved by "
            "hundreds in 3 steps); set model.dtype=bfloat16 or float32, or model.lora.enabled=true (the "
            "adapters train in float32)"
        )


def bfloat16_weights_note(model_cfg: ModelConfig, train_cfg: TrainConfig) -> str | None:
    """A note for training all weights in bfloat16 at a learning rate its 8 significant bits
    cannot hold: AdamW's step is about the learning rate, and a weight larger than 512 times it
    rounds the step away (with 1e-3-sized gradients at 1e-6, 98% of a 0.02-scale tensor's weights
    never moved in 10 steps; at 1e-5, 85%). None where the step holds on weights of ~0.02, or
    where the trainer keeps float32 master weights (train.master_weights)."""
    learning_rate = train_cfg.learning_rate
    if model_cfg.dtype != "bfloat16" or model_cfg.lora.enabled or 512 * learning_rate >= 0.02:
        return None
    if train_cfg.master_weights:
        return None
    return (
        f"note: model.dtype=bfloat16 trains bfloat16 weights, which keep 8 significant bits: an AdamW step "
        f"of about train.learning_rate={learning_rate:g} rounds away on every weight larger than "
        f"{512 * learning_rate:.1g}, most of a model's, so those never change; set train.master_weights=true "
        "(float32 copies), model.dtype=float32, or model.lora.enabled=true (the adapters train in float32)"
    )


LARGE_RATE = 1e-4  # a full fine-tuning learning rate above this is said, on a pretrained model
PRETRAINED_PARAMETERS = 100_000_000  # a checkpoint of about this many parameters or more


def learning_rate_note(train_cfg: TrainConfig, model_cfg: ModelConfig, model_config: Any) -> str | None:
    """A note for full fine-tuning a pretrained-size checkpoint (`model_config`, its
    transformers config) at a learning rate above LARGE_RATE: Forge's default (and the CPU
    configs') 1e-3 fits the tiny random model; RL on a pretrained model runs at 1e-6 to 1e-5
    (TRL's and verl's default is 1e-6), and 1e-3 wrecks it in a few steps. None for LoRA, or
    where the checkpoint's size cannot be read from its config."""
    if model_cfg.lora.enabled or train_cfg.learning_rate <= LARGE_RATE:
        return None
    sizes = [getattr(model_config, name, None) for name in ("hidden_size", "num_hidden_layers", "vocab_size")]
    if not all(isinstance(size, int) for size in sizes):
        return None
    hidden, layers, vocab = sizes
    parameters = 12 * layers * hidden**2 + vocab * hidden  # attention and MLP, and the embeddings
    if parameters < PRETRAINED_PARAMETERS:
        return None
    return (
        f"note: train.learning_rate={train_cfg.learning_rate:g} trains every weight of a ~{parameters / 1e9:.1f}B-"
        "parameter checkpoint; that rate fits Forge's tiny random model (its default and the CPU configs'), "
        "while RL on a pretrained model runs at 1e-6 to 1e-5 (TRL's and verl's default is 1e-6) and 1e-3 "
        "wrecks it in a few steps: set train.learning_rate"
    )


def off_policy_note(train_cfg: TrainConfig) -> str | None:
    """A note for `pg` (-A x logprob, no importance ratio) trained on data its policy did not
    sample: every optimizer step of a step after its first (`train.minibatches_per_step`, and
    every pass after the first, `train.epochs_per_step`), and
    an async run's batches, sampled up to `async.max_staleness` versions back. TRL and verl clip
    every such step; pg takes it uncorrected. None when the loss or `tis_cap` corrects it."""
    if train_cfg.loss != "pg" or train_cfg.tis_cap is not None:
        return None
    where = [f"train.minibatches_per_step={train_cfg.minibatches_per_step}"] * (
        train_cfg.minibatches_per_step > 1
    )
    where += [f"train.epochs_per_step={train_cfg.epochs_per_step}"] * (train_cfg.epochs_per_step > 1)
    where += ["train.mode=async"] * (train_cfg.mode == "async")
    if not where:
        return None
    return (
        f"note: {' and '.join(where)} with train.loss=pg trains on episodes an earlier policy sampled, "
        "with no importance ratio or clip (pg is -advantage x logprob, exact only on-policy); set "
        "train.loss=ppo_clip (or cispo, gspo), or train.tis_cap to weight pg's tokens by the capped ratio"
    )


def keeps_master_weights(train_cfg: TrainConfig, params: Iterable[torch.nn.Parameter]) -> bool:
    """Whether the trainer steps float32 copies of its weights and sums their gradients in
    float32 (forge.train.master_weights): train.master_weights, with bfloat16 weights to train."""
    return train_cfg.master_weights and any(p.dtype == torch.bfloat16 for p in params if p.requires_grad)


class Trainer:
    fused_optimizer = True  # see __init__
    writes_files = True  # this process writes checkpoints (one of several data-parallel ones may not)

    def __init__(
        self,
        model_path: str | Path,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        trainer_cfg: TrainerConfig,
        seed: int = 0,
        num_threads: int | None = None,
        temperature: float = 1.0,
    ) -> None:
        from forge.actor_errors import quiet_known_creation_errors
        from forge.models.loading import load_tokenizer, node_checkpoint_folder

        quiet_known_creation_errors()  # the driver says a refusal here in one line (faults.wait_for_trainer)
        check_trainable_dtype(model_cfg)
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        torch.manual_seed(seed)
        # A hub id resolves in this node's cache; a failure names this actor and its node.
        self.model_path = node_checkpoint_folder(model_path, model_cfg.revision, "trainer")
        model_path = self.model_path
        self.model_cfg = model_cfg
        self.train_cfg = train_cfg
        self.trainer_cfg = trainer_cfg
        # The policy trained is the one the engines sample from, softmax(logits /
        # rollout.temperature): its logprobs, the reference's and the entropy are taken at that
        # temperature, so an on-policy token's importance ratio is 1 (taken at temperature 1
        # while the engine sampled at 0.7, an on-policy step of the tiny model measured a
        # mismatch KL of 0.032 and clipped PPO's ratio: tests/test_trainer_temperature.py).
        self.temperature = temperature
        self.loss_cfg = loss_config(train_cfg)
        self.skips_zero_advantage = (
            train_cfg.skip_zero_advantage
            and train_cfg.loss in VANISH_AT_ZERO_ADVANTAGE
            and train_cfg.kl_coef == 0
            and train_cfg.entropy_coef == 0
        )
        self.tokenizer = load_tokenizer(model_path)
        self.device = self.model_device(model_cfg, train_cfg)
        self.attn_implementation = self._choose_attention()
        self.packing = trainer_cfg.packing  # padded after a failed self-check
        self.model = self.load(trainable=True)
        if trainer_cfg.gradient_checkpointing:
            checkpointing(self.model, "enable")()
        self.model = self.prepare_model(self.model)
        self.trainable = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        params = list(self.trainable.values())
        # The fused kernel steps all tensors at once (on CPU 0.25 ms against 1.07 ms per step
        # for the smoke model). Where accelerate moves or shards the parameters after this
        # (forge.train.distributed), torch picks its own default.
        fused = self.fused_optimizer and all(p.device.type in ("cpu", "cuda") for p in params)
        # bfloat16 weights keep 8 significant bits: steps at RL's learning rates round away on
        # them, so the trainer steps float32 copies, and sums a step's micro-batch gradients
        # in float32 (forge.train.master_weights).
        self.float32_gradients = keeps_master_weights(train_cfg, params)
        optimizer_class = MasterWeightAdamW if self.float32_gradients else torch.optim.AdamW
        self.optimizer = optimizer_class(
            params,
            lr=train_cfg.learning_rate,
            weight_decay=train_cfg.weight_decay,
            fused=True if fused else None,
        )
        total = train_cfg.max_steps * train_cfg.optimizer_steps_per_step
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(
                step, train_cfg.warmup_steps, total, train_cfg.lr_schedule, train_cfg.min_lr_ratio
            ),
        )
        self.reference = self._frozen_reference() if train_cfg.kl_coef > 0 else None
        self.policy_version = 0
        self._shuffle = torch.Generator().manual_seed(seed)
        # Last, once the optimizer holds the parameters: the check's forwards must not change
        # what it was built over (forge.train.distributed reshards after them).
        self.self_check_result = self._self_check()
        self._check_policy_forward()

    # Overridden by forge.train.distributed, where accelerate places the model.
    def model_device(self, model_cfg: ModelConfig, train_cfg: TrainConfig) -> torch.device:
        """`model.device`, with `auto` following the trainer's `train.num_gpus` reservation."""
        from forge.models.loading import resolve_device

        return resolve_device(model_cfg.device, train_cfg.num_gpus)

    def _choose_attention(self) -> str:
        """trainer.attn_implementation, `auto` resolved for the device the trainer computes on
        (which a data-parallel process's `self.device` may not be while it loads)."""
        from transformers import AutoConfig

        from forge.models.loading import choose_attn_implementation, resolve_device

        compute_device = resolve_device(self.model_cfg.device, self.train_cfg.num_gpus)
        return choose_attn_implementation(
            AutoConfig.from_pretrained(str(self.model_path)),
            self.trainer_cfg.attn_implementation,
            compute_device,
            "trainer.attn_implementation",
        )

    def load(self, trainable: bool) -> torch.nn.Module:
        """The policy (`trainable`) or the frozen KL reference, from the checkpoint."""
        from forge.models.loading import load_model

        return load_model(
            self.model_path,
            self.model_cfg,
            trainable=trainable,
            device=self.device,
            attn_implementation=self.attn_implementation,
        )

    def _self_check(self) -> Any:
        """trainer.self_check: the tree path against separate forwards through the loaded model
        (forge.tree.self_check); a disagreement falls back to padded packing or stops."""
        from forge.tree.self_check import check_tree_path

        cfg = self.trainer_cfg
        if self.packing != "tree" or cfg.self_check == "off":
            return None
        result = check_tree_path(
            self.model, cfg.attention, longest=cfg.max_tokens_per_microbatch, both_looks=self.world_size > 1
        )
        self.after_forward_only()
        if self.all_agree(result.ok):
            return result
        reason = result.reason if not result.ok else "on another of the trainer's processes"
        message = f"forge: the tree path disagrees with separate forwards on this model: {reason}"
        if cfg.self_check == "stop":
            raise RuntimeError(f"{message}; set trainer.packing: padded (or trainer.self_check: fallback)")
        print(
            f"{message}; training with padded packing instead (trainer.self_check: stop refuses)", flush=True
        )
        self.packing = "padded"
        return result

    def _check_policy_forward(self) -> None:
        """Under gradient checkpointing a layer keeps its own training flag (`policy_mode`): where
        the layer's own code applies dropout by it, the trainer's forward is random still and its
        logprobs are not the sampled policy's (OPT with its 0.1: PPO's ratio clipped on 26% of an
        on-policy step's tokens). Two forwards tell; then it trains without checkpointing, or
        stops (trainer.self_check: stop).

        The two forwards are held to forge.tree.agreement's rule against two in eval mode (the
        same computation, no flag read): exact in fp32; in bf16/fp16 NOISE_FACTOR times what
        the eval pair differs by (a GPU's run-to-run noise), at least EPS_FACTOR eps, the
        OUTLIERS largest (a near-tie flip) set aside, over two looks. Without dropout both pairs are bitwise equal on CPU;
        OPT's dropout moves the third-largest position by 2.4 at 0.1 and 0.85 at 0.01 (fp32,
        bf16 and fp16 alike), 27x bf16's bound of 0.031."""
        from forge.tree.agreement import agreement
        from forge.tree.self_check import check_sequences

        if not self.trainer_cfg.gradient_checkpointing or self.trainer_cfg.self_check == "off":
            return
        vocab = int(self.model.config.vocab_size)
        dtype = self.model.get_input_embeddings().weight.dtype
        # Both looks always (in low precision): whether the rule takes its second depends on this
        # process's own noise, and under FSDP every process must run the same forwards.
        verdict = agreement(
            lambda seed: policy_forward_noise(self.model, check_sequences(vocab, seed=seed)[0]),
            dtype,
            both_looks=True,
        )
        self.after_forward_only()
        if self.all_agree(verdict.ok):
            return
        if verdict.ok:
            verdict = dataclasses.replace(verdict, ok=False)  # another process's forwards differed
        message = (
            f"forge: {type(self.model).__name__}'s layers apply dropout of their own while gradient checkpointing "
            f"keeps them training (two forwards of one sequence: {verdict.describe('logprob difference')}), so its logprobs would not "
            "be the sampled policy's"
        )
        if self.trainer_cfg.self_check == "stop":
            raise RuntimeError(f"{message}; set trainer.gradient_checkpointing: false")
        print(
            f"{message}; training without gradient checkpointing (trainer.self_check: stop refuses)",
            flush=True,
        )
        checkpointing(self.model, "disable")()

    @property
    def world_size(self) -> int:
        """How many processes train together (forge.train.distributed: data-parallel ones)."""
        return 1

    def all_agree(self, ok: bool) -> bool:
        """Whether `ok` holds on every process of this trainer. A load-time check's verdict that
        changes what a step runs (packing, checkpointing) must be the same on all of them, or
        their collectives stop matching and the step hangs."""
        return ok

    def after_forward_only(self) -> None:
        """After forwards without a backward (the self-check): leave the model as a step
        expects it (forge.train.distributed: FSDP2 reshards what the forwards gathered)."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        """The model the optimizer is built over (forge.train.distributed shards it here)."""
        return model

    def _frozen_reference(self) -> Any:
        if self.model_cfg.lora.enabled:
            return None  # the peft model with its adapters disabled is the reference
        return self.load(trainable=False)

    def _reference_logprobs(self, batch: Any) -> list[torch.Tensor]:
        with torch.no_grad():
            if self.reference is not None:
                return batch.forward_logprobs(self.reference, self.temperature)
            with self.model.disable_adapter():
                return batch.forward_logprobs(self.model, self.temperature)

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """Train on one rollout batch: `train.epochs_per_step` passes over it, each
        `train.minibatches_per_step` optimizer steps over disjoint slices of a fresh shuffle
        of `samples` (1 and 1 = a single step on all of them). Bumps the policy version once,
        since workers sync once per batch. Token-mean metrics are over every pass's tokens,
        step metrics (loss, grad_norm) means over every optimizer step.

        Data-parallel processes (forge.train.distributed) each get the whole batch, cut the
        same slices (the same shuffle) and train their share of each (`own_share`), so N
        processes take the steps one process takes."""
        started = time.perf_counter()
        samples = [s for s in samples if trainable(s)]
        self.last_share: list[Sample] = []  # what this process trained on (skipped samples included)
        parts = min(self.train_cfg.minibatches_per_step, len(samples))  # 0: nothing to train
        if parts == 0:
            return {"train_seconds": time.perf_counter() - started, "trained_samples": 0.0}
        policy_mode(self.model)  # the forward is the policy the engine sampled: no dropout, no jitter
        epochs = self.train_cfg.epochs_per_step
        step_totals: dict[str, float] = {}  # loss, grad_norm, optimizer_steps_skipped: means over the steps
        token_sums: dict[str, float] = {}  # token-mean metrics, times their tokens, over every step
        computed = separate = num_microbatches = 0
        for epoch in range(epochs):
            order = torch.randperm(len(samples), generator=self._shuffle).tolist()
            for part in range(parts):
                minibatch = self.own_share([samples[i] for i in order[part::parts]])
                if epoch == 0:
                    self.last_share += minibatch
                step_metrics, token_metrics, batches = self._optimizer_step(minibatch)
                for key, value in step_metrics.items():
                    step_totals[key] = step_totals.get(key, 0.0) + value / (parts * epochs)
                for key, value in token_metrics.items():
                    token_sums[key] = token_sums.get(key, 0.0) + value
                computed += sum(b.tokens_computed for b in batches)
                separate += sum(b.tokens_separate for b in batches)
                num_microbatches += len(batches)
        self.policy_version += 1
        trained = [s for s in self.last_share if not self._skipped(s)]
        tokens = loss_tokens(trained) * epochs  # every pass trains them again
        # Token means over every token trained this step (none on a step that skipped every sample).
        totals = {key: value / tokens for key, value in token_sums.items()} if tokens else {}
        totals.update(step_totals)
        if computed:  # none when every sample was skipped for a zero advantage
            totals["tree_token_ratio"] = separate / computed
        totals.update(
            learning_rate=self.scheduler.get_last_lr()[0],
            tokens_computed=float(computed),
            tokens_separate=float(separate),
            microbatches=float(num_microbatches),
            trained_samples=float(len(trained)),
            zero_advantage_skipped=(len(self.last_share) - len(trained)) / max(len(self.last_share), 1),
            train_seconds=time.perf_counter() - started,
        )
        # The step's tensors and packed batches are freed by now; give their pages back, or
        # a run whose batches vary in size keeps its largest step's heap (forge.heap).
        del batches
        release_free_heap()
        return totals

    def own_share(self, minibatch: list[Sample]) -> list[Sample]:
        """The part of a minibatch this process trains on: all of it (forge.train.distributed
        takes its process's share)."""
        return minibatch

    def _skipped(self, sample: Sample) -> bool:
        """Left out of the forward: its loss and gradient are exactly zero (train.skip_zero_advantage)."""
        return self.skips_zero_advantage and sample.advantage == 0

    def _optimizer_step(self, samples: list[Sample]) -> tuple[dict[str, float], dict[str, float], list[Any]]:
        """Forward/backward micro-batch by micro-batch, then one optimizer step.
        Returns the step's metrics, its token-mean metrics times their tokens (summed over the
        micro-batches that trained a token) and its micro-batches (padding ones left out)."""
        cfg = self.trainer_cfg
        num_tokens, num_samples = self.loss_denominators(samples)  # skipped samples count here
        run = [s for s in samples if not self._skipped(s)]
        batches = microbatches(run, self.packing, cfg.max_tokens_per_microbatch, cfg.attention) if run else []
        work = [(batch, [run[i] for i in batch.sample_indices]) for batch in batches]
        missing = self.microbatches_to_run(len(batches)) - len(batches)
        if missing:
            padding = [PADDING_SAMPLE]
            [padding_batch] = microbatches(
                padding, self.packing, cfg.max_tokens_per_microbatch, cfg.attention
            )
            work += [(padding_batch, padding)] * missing
        token_sums: dict[str, float] = {}
        loss_total = 0.0
        for index, (batch, members) in enumerate(work):
            with self.gradient_sync(last=index == len(work) - 1):
                loss, tokens, stats = self._microbatch_loss(batch, members, num_tokens, num_samples)
                self.backward(loss)
            self.accumulate_gradients(last=index == len(work) - 1)
            loss_total += float(loss.detach())
            if tokens:  # a padding micro-batch trains no token, so it reports no token means
                for key, value in stats.items():
                    token_sums[key] = token_sums.get(key, 0.0) + value * tokens
        grad_norm = self.clip_gradients()
        # A step without learning signal (every advantage zero and no KL term, as when each
        # group of a near-solved task all succeeded) leaves the weights alone. AdamW would
        # still move them on momentum alone, for ~20 steps after the last real gradient:
        # in async runs that drift, on one-step-stale data, set off collapses from 0.99
        # success to 0.2-0.4 (see the issue 5 note).
        skipped = bool(grad_norm == 0)
        if not skipped:
            self.optimizer.step()
        with warnings.catch_warnings():
            # The schedule counts every step, a skipped one too, on purpose; torch's warning
            # about a scheduler step before any optimizer step (a run whose first steps had no
            # signal, e.g. a random model that never succeeds) only alarmed users' consoles.
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        step_metrics = {
            "loss": loss_total,
            "grad_norm": float(grad_norm),
            "optimizer_steps_skipped": float(skipped),
        }
        return step_metrics, token_sums, batches

    def _microbatch_loss(
        self, batch: Any, members: list[Sample], num_tokens: int, num_samples: int
    ) -> tuple[torch.Tensor, float, dict[str, float]]:
        """One micro-batch's share of the step's loss, its loss tokens, and its metrics
        (token means over those tokens)."""
        entropies: list[torch.Tensor] | None = None
        if self.train_cfg.entropy_coef > 0:  # one more (N, V) tensor: only when it is used
            logprobs, entropies = batch.forward_logprobs_and_entropy(self.model, self.temperature)
        else:
            logprobs = batch.forward_logprobs(self.model, self.temperature)
        width = max(lp.shape[0] for lp in logprobs)
        new_logprobs = pad_rows(logprobs, width)
        entropy = pad_rows(entropies, width) if entropies is not None else None
        behaviour = pad_rows([torch.tensor(s.behaviour_logprobs[1:]) for s in members], width)
        mask = pad_rows([torch.tensor(s.loss_mask[1:], dtype=torch.float32) for s in members], width)
        advantages = torch.tensor([s.advantage for s in members], dtype=torch.float32)
        behaviour, mask, advantages = (t.to(new_logprobs) for t in (behaviour, mask, advantages))
        ref = None
        if self.train_cfg.kl_coef > 0:
            ref = pad_rows(self._reference_logprobs(batch), width).to(new_logprobs)
        per_token, batch_metrics = compute_loss(
            self.train_cfg.loss, new_logprobs, behaviour, advantages, mask, self.loss_cfg, ref, entropy
        )
        loss = aggregate_loss(per_token, mask, self.train_cfg.loss_aggregation, num_tokens, num_samples)
        return loss, float(mask.sum()), batch_metrics

    # Overridden by forge.train.distributed, where every process must run as many
    # micro-batches per step as the others, and the loss is averaged over all of them.
    def microbatches_to_run(self, num_microbatches: int) -> int:
        """Micro-batches to run for a step that has `num_microbatches` of its own; any more
        are padding, whose loss is exactly zero."""
        return num_microbatches

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward and backward; `last` is the step's last."""
        return contextlib.nullcontext()

    def loss_denominators(self, samples: list[Sample]) -> tuple[int, int]:
        """Loss tokens and samples the step's loss is averaged over."""
        return loss_tokens(samples), len(samples)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def accumulate_gradients(self, last: bool) -> None:
        """After a micro-batch's backward (`last`: the step's last): under master weights its
        gradients join the optimizer's float32 sums, which the clip and the step then use."""
        if self.float32_gradients:
            self._torch_optimizer().accumulate_gradients()

    def clip_gradients(self) -> torch.Tensor:
        if self.float32_gradients:
            return clip_norm(self._torch_optimizer().gradients(), self.train_cfg.max_grad_norm)
        return torch.nn.utils.clip_grad_norm_(list(self.trainable.values()), self.train_cfg.max_grad_norm)

    def weights(self) -> dict[str, torch.Tensor]:
        """Tensors a rollout worker needs to match this policy: only the trainable ones
        (LoRA adapters under peft, every weight in full fine-tuning)."""
        state = self.model.state_dict()
        return {name: state[name].detach().cpu().clone() for name in self.trainable if name in state}

    def publish_weights(self) -> tuple[list[Any], int]:
        """Put the weights in the Ray object store once, for every worker to get.

        Returns the reference wrapped in a list, so Ray passes the handle itself on to
        workers instead of fetching the tensors into the caller. The tensors travel packed
        (`forge.weights`); readers `unpack_weights` them."""
        import ray

        from forge.weights import pack_weights

        return [ray.put(pack_weights(self.weights()))], self.policy_version

    def train_and_publish(self, samples: list[Sample]) -> tuple[dict[str, float], list[Any], int]:
        """`train_step`, then `publish_weights`, in one call: the new weights are out the
        moment the step ends, even when the caller has already queued the next step."""
        metrics = self.train_step(samples)
        return (metrics, *self.publish_weights())

    def training_state(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """The trainable weights and the optimizer state, keyed by parameter name, on CPU."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        options = self._state_options()
        weights, optimizer = get_state_dict(self.model, self._torch_optimizer(), options=options)
        # A tied weight appears under each of its names; it is trained (and saved) under one.
        return {name: weights[name] for name in self.trainable if name in weights}, optimizer

    def load_training_state(self, weights: dict[str, torch.Tensor], optimizer: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model,
            self._torch_optimizer(),
            model_state_dict=weights,
            optim_state_dict=optimizer,
            options=self._state_options(),
        )

    def _state_options(self) -> Any:
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        # Whole tensors (not shards) on CPU; the frozen base of a LoRA model is not saved.
        return StateDictOptions(
            full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, strict=False
        )

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return self.optimizer

    def save_state(self, directory: str) -> None:
        """Everything `load_state` needs to continue bit for bit (forge.train.checkpoint)."""
        from forge.train.checkpoint import save_trainer

        save_trainer(self, directory)

    def load_state(self, directory: str) -> int:
        from forge.train.checkpoint import load_trainer

        load_trainer(self, directory)
        return self.policy_version

    def save(self, directory: str | Path) -> str:
        """A checkpoint loadable with `from_pretrained` (full model, adapters merged)."""
        return self.save_model(self.model, directory)

    def save_model(self, model: torch.nn.Module, directory: str | Path) -> str:
        return save_model_folder(model, self.tokenizer, directory)


def save_model_folder(model: torch.nn.Module, tokenizer: Any, directory: str | Path) -> str:
    """The model folder a run ends with (final/), which `forge export` also writes from a
    checkpoint: `from_pretrained` loads it, LoRA adapters merged into the weights."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "merge_and_unload"):
        import copy

        model = copy.deepcopy(model).merge_and_unload()
    with naming(directory):
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
    return str(directory)


def clip_norm(gradients: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """`torch.nn.utils.clip_grad_norm_` over gradient tensors themselves (the float32 sums of
    forge.train.master_weights, which are no parameter's `.grad`): scales them in place to
    a total norm of at most `max_norm` and returns the norm they had."""
    total = torch.nn.utils.get_total_norm(gradients)
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for gradient in gradients:
        gradient.mul_(scale.to(gradient.device))
    return total


def checkpointing(model: Any, action: str) -> Any:
    """The model's `activation_checkpointing_{action}` (transformers' name from 5.25, where the
    `gradient_checkpointing_*` one warns of its removal in v6), or the older name before it."""
    return getattr(model, f"activation_checkpointing_{action}", None) or getattr(
        model, f"gradient_checkpointing_{action}"
    )
