"""Data-parallel training on accelerate: every process holds a shard of each rollout batch,
and the gradients of the whole batch are combined by DDP (or FSDP2 where torch has it).

Start one process per device with `accelerate launch` or `torchrun` (they set RANK,
WORLD_SIZE, MASTER_ADDR); on CPU the processes talk over gloo. Gradient accumulation is
the trainer's own micro-batching: every micro-batch of a step backpropagates before the
one optimizer step. The single-process `Trainer` stays the default path.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import torch

from forge.train.trainer import Trainer, loss_tokens, trainable
from forge.types import Sample

STRATEGIES = ("ddp", "fsdp")


def make_accelerator(strategy: str, mixed_precision: str) -> Any:
    from accelerate import Accelerator

    if strategy not in STRATEGIES:
        raise ValueError(f"trainer strategy {strategy!r} is not one of {STRATEGIES}")
    plugin = None
    if strategy == "fsdp" and not torch.cuda.is_available():
        logging.getLogger("forge").warning(
            "train.strategy=fsdp needs CUDA; on CPU accelerate runs the ranks as DDP"
        )
    if strategy == "fsdp":
        from accelerate import FullyShardedDataParallelPlugin

        plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    return Accelerator(mixed_precision=mixed_precision, fsdp_plugin=plugin, cpu=not torch.cuda.is_available())


def shard(samples: list[Sample], rank: int, world_size: int) -> list[Sample]:
    """This process's share of a batch: every world_size-th sample, starting at rank."""
    return samples[rank::world_size]


class ForwardThrough:
    """Calls go through the DDP/FSDP wrapper, so gradients are combined over processes;
    attribute lookups (config, input embeddings) go to the model inside it."""

    def __init__(self, wrapped: torch.nn.Module, module: torch.nn.Module) -> None:
        self._wrapped, self._module = wrapped, module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._module, name)


class DistributedTrainer(Trainer):
    """A `Trainer` whose `train_step` trains on this process's shard of the batch, with loss
    denominators summed over all processes, so N processes take the step one process takes
    on the whole batch."""

    fused_optimizer = False  # accelerate moves (DDP) or shards (FSDP2) the parameters after the optimizer is built

    def __init__(self, *args: Any, strategy: str = "ddp", mixed_precision: str = "no", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.accelerator = make_accelerator(strategy, mixed_precision)
        # The scheduler is not prepared: accelerate would step it once per process.
        self.wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self._batch_trains = True
        self.module = self.accelerator.unwrap_model(self.wrapped)
        self.model = self.module
        if self.reference is not None:  # the frozen reference runs beside the policy
            self.reference.to(self.accelerator.device)
        self.trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}

    def model_device(self, model_cfg: Any, train_cfg: Any) -> torch.device:
        """Load on CPU: `accelerator.prepare` puts the model on this process's device (DDP)
        or shards it over the processes (FSDP2)."""
        return torch.device("cpu")

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """`samples` is the whole batch (the same list on every process), so every decision
        taken from it (to train at all, or to refuse) is the same on every process."""
        smallest = len(samples) // self.world_size
        if smallest < self.train_cfg.minibatches_per_step:
            raise ValueError(
                f"{len(samples)} samples over {self.world_size} processes leave {smallest} on a process, fewer "
                f"than train.minibatches_per_step={self.train_cfg.minibatches_per_step}; lower it or raise "
                "rollout.tasks_per_step"
            )
        self._batch_trains = any(trainable(s) for s in samples)
        return super().train_step(shard(samples, self.accelerator.process_index, self.world_size))

    # Every collective (the loss denominators, DDP's gradient all-reduce and buffer broadcast,
    # FSDP2's all-gathers) must be entered by every process the same number of times, or the
    # processes wait on each other forever. So all take the same optimizer steps, even one
    # whose shard has nothing to train, and each step runs as many micro-batches as the
    # process that has the most; the others make up the count with padding micro-batches.
    def optimizer_steps_for(self, num_samples: int) -> int:
        return self.train_cfg.minibatches_per_step if self._batch_trains else 0

    def microbatches_to_run(self, num_microbatches: int) -> int:
        counts = self.accelerator.gather(torch.tensor([num_microbatches], device=self.accelerator.device))
        return int(counts.max().item())

    def _optimizer_step(self, samples: list[Sample]) -> tuple[dict[str, float], list[Any]]:
        self.model = ForwardThrough(self.wrapped, self.module)
        try:
            return super()._optimizer_step(samples)
        finally:
            self.model = self.module

    def _reference_logprobs(self, batch: Any) -> list[torch.Tensor]:
        model, self.model = self.model, self.module
        try:
            return super()._reference_logprobs(batch)
        finally:
            self.model = model

    def gradient_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are combined over processes once per step, in the last micro-batch's
        backward (which every process enters together); before it they accumulate locally."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(self.wrapped)

    def loss_denominators(self, samples: list[Sample]) -> tuple[int, int]:
        local = torch.tensor([loss_tokens(samples), len(samples)], dtype=torch.float32)
        local = local.to(self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum")
        return int(total[0].item()), int(total[1].item())

    def backward(self, loss: torch.Tensor) -> None:
        # Each process's loss is its part of the global mean; DDP and FSDP average gradients
        # over processes, so scaling by the process count makes that average a sum.
        self.accelerator.backward(loss * self.world_size)

    def clip_gradients(self) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(list(self.trainable.values()), self.train_cfg.max_grad_norm)
