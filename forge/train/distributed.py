"""Data-parallel training: every process holds a shard of each rollout batch, and the
gradients of the whole batch are combined by DDP (accelerate) or FSDP2 (torch's
`fully_shard`, which also shards the weights, gradients and optimizer state).

Start one process per device with `accelerate launch` or `torchrun` (they set RANK,
WORLD_SIZE, MASTER_ADDR); on CPU the processes talk over gloo, and FSDP2 shards there
too, so both strategies are tested without a GPU. Gradient accumulation is the trainer's
own micro-batching: every micro-batch of a step backpropagates before the one optimizer
step. The single-process `Trainer` stays the default path.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from forge.train.trainer import Trainer, keeps_master_weights, loss_tokens
from forge.tree.trie import TreeOrder
from forge.types import Sample

STRATEGIES = ("ddp", "fsdp")


def make_accelerator(strategy: str, mixed_precision: str) -> Any:
    """The process group and this process's device. Under FSDP2 accelerate does no more:
    it runs FSDP only on accelerators, so the trainer shards the model itself
    (`shard_model`), the same way on CPU and GPU."""
    from accelerate import Accelerator

    if strategy not in STRATEGIES:
        raise ValueError(f"trainer strategy {strategy!r} is not one of {STRATEGIES}")
    return Accelerator(
        mixed_precision="no" if strategy == "fsdp" else mixed_precision, cpu=not torch.cuda.is_available()
    )


def shard_model(
    model: torch.nn.Module,
    device_type: str,
    world_size: int,
    mixed_precision: str,
    frozen: bool = False,
    float32_reduce: bool = False,
) -> torch.nn.Module:
    """FSDP2 over all processes: each transformer block is one unit (its weights are
    gathered just for its forward and backward), and the root holds the rest. The model
    is sharded in place; its parameters become DTensors on `device_type`.

    `frozen`: a model that only runs forwards (the KL reference). FSDP2 keeps the root's
    weights gathered after a forward, for the backward that follows; with no backward to
    come, they are resharded at once. `float32_reduce`: bfloat16 weights under master
    weights, whose gradients are averaged in float32 (then rounded once to their shard)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device_type, (world_size,))
    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":  # compute in bf16, average gradients in fp32
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif float32_reduce:
        policy = MixedPrecisionPolicy(reduce_dtype=torch.float32)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # under peft
    blocks = set(getattr(base, "_no_split_modules", None) or ())
    for module in model.modules():
        if type(module).__name__ in blocks:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, **({"reshard_after_forward": True} if frozen else {}))
    return model


def shard_from_first_process(
    model: torch.nn.Module,
    device: torch.device,
    world_size: int,
    mixed_precision: str,
    frozen: bool = False,
    float32_reduce: bool = False,
) -> torch.nn.Module:
    """`shard_model` for a model the first process loaded whole and the others built on the
    meta device (shapes, no data): each process's shard of every weight comes from the first
    process by broadcast, and so do the buffers, which the state dict leaves out (rotary
    frequencies). Only one process reads the checkpoint and holds the whole model."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    first = dist.get_rank() == 0
    whole = model.state_dict() if first else {}
    shard_model(model, device.type, world_size, mixed_precision, frozen, float32_reduce)
    if not first:
        model.to_empty(device=device)
    set_model_state_dict(
        model, whole, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    for buffer in model.buffers():
        dist.broadcast(buffer, src=0)
    return model


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole of a tensor FSDP2 shards (a collective: every process must call it)."""
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


SUMMED = ("loss", "tokens_computed", "tokens_separate", "microbatches", "trained_samples")
SHARED = ("learning_rate", "grad_norm", "optimizer_steps_skipped")  # the same on every process


def combine_metrics(per_process: list[tuple[dict[str, float], int, int]]) -> dict[str, float]:
    """One step's metrics for the whole batch, from each process's metrics on its shard, the
    loss tokens it trained on and its samples with a token to train: counts and the loss
    (each process's is its part of the global mean) add up, token means are weighted by
    those tokens, the skipped fraction by those samples, and the step took as long as the
    slowest process."""
    first = per_process[0][0]
    out = {key: first[key] for key in SHARED if key in first}
    for key in SUMMED:
        if key in first:
            out[key] = sum(m[key] for m, _, _ in per_process)
    out["train_seconds"] = max(m["train_seconds"] for m, _, _ in per_process)
    if out.get("tokens_computed"):
        out["tree_token_ratio"] = out["tokens_separate"] / out["tokens_computed"]
    if "zero_advantage_skipped" in first:
        skipped = sum(m.get("zero_advantage_skipped", 0.0) * n for m, _, n in per_process)
        out["zero_advantage_skipped"] = skipped / max(sum(n for _, _, n in per_process), 1)
    averaged = {key for m, _, _ in per_process for key in m} - set(out) - set(SUMMED)
    for key in sorted(averaged):
        reported = [(m[key], tokens) for m, tokens, _ in per_process if key in m]
        weight = sum(tokens for _, tokens in reported)
        if weight:
            out[key] = sum(value * tokens for value, tokens in reported) / weight
        else:  # no process trained a token (a padding-only step reports no token means)
            out[key] = sum(value for value, _ in reported) / len(reported)
    return out


def shard(samples: list[Sample], rank: int, world_size: int, min_samples: int = 1) -> list[Sample]:
    """This process's share of a batch (see `shard_indices`)."""
    shards = shard_indices([s.token_ids for s in samples], world_size, min_samples)
    return [samples[i] for i in shards[rank]]


def shard_indices(token_ids: list[list[int]], world_size: int, min_samples: int = 1) -> list[list[int]]:
    """Split a batch over `world_size` processes so that samples sharing a prefix stay
    together: the batch in its prefix tree's order cut into contiguous runs, the largest
    run tree (the tokens its process computes, a cut prefix counted on both sides) as small
    as it can be, each run at least `min_samples` long where the batch allows. Dealing
    samples out in turn would split every group over the processes, each computing the
    shared prompt again (`python -m bench.tree_sharding`). Every process computes the same
    split from the same batch."""
    tree = TreeOrder(token_ids)
    n = len(tree)

    def greedy(cap: int) -> list[int]:
        """Ends of the fewest runs within `cap` (taking as much as fits is optimal: a run's
        size only grows as it extends, and a part of a run is no larger than the run)."""
        ends, start = [], 0
        while start < n:
            end = start + 1
            while end < n and tree.run_size(start, end + 1) <= cap:
                end += 1
            ends.append(end)
            start = end
        return ends

    low, high = int(tree.lengths.max(initial=0)), tree.run_size(0, n) if n else 0
    while low < high:  # the smallest cap that needs at most world_size runs
        cap = (low + high) // 2
        low, high = (low, cap) if len(greedy(cap)) <= world_size else (cap + 1, high)
    ends = greedy(low)
    runs = list(zip([0, *ends][: len(ends)], ends, strict=True))
    while len(runs) < world_size and any(end - start > 1 for start, end in runs):
        # One more run: halve the largest that can be halved, where its larger half is smallest.
        start, end = max((r for r in runs if r[1] - r[0] > 1), key=lambda r: tree.run_size(*r))
        cut = min(range(start + 1, end), key=lambda m: max(tree.run_size(start, m), tree.run_size(m, end)))
        runs[runs.index((start, end))] = (start, cut)
        runs.append((cut, end))
        runs.sort()
    bounds = [0] + [end for _, end in runs[:-1]]
    bounds += [n] * (world_size - len(bounds))
    for k in range(1, world_size):  # each run its minimum, where the batch allows
        latest = max(n - (world_size - k) * min_samples, 0)  # room for the runs after it
        bounds[k] = min(max(bounds[k], bounds[k - 1] + min_samples), latest)
        bounds[k] = max(bounds[k], bounds[k - 1])
    bounds.append(n)
    return [tree.order[bounds[k] : bounds[k + 1]] for k in range(world_size)]


class ForwardThrough:
    """Calls go through the DDP wrapper, so gradients are combined over processes;
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
    on the whole batch.

    Every process must make the same calls: `train_step`, and also `publish_weights`,
    `save` and `save_state`, which gather FSDP2's shards (the first process alone then
    publishes or writes)."""

    fused_optimizer = False  # accelerate moves the parameters (DDP) after the optimizer is built

    def __init__(self, *args: Any, strategy: str = "ddp", mixed_precision: str = "no", **kwargs: Any) -> None:
        self.strategy, self.mixed_precision = strategy, mixed_precision
        # Before the model is loaded: shard_model needs the process group.
        self.accelerator = make_accelerator(strategy, mixed_precision)
        super().__init__(*args, **kwargs)
        if self.sharded:  # FSDP2 holds the model since prepare_model; the optimizer steps its shards
            self.wrapped = self.model
        else:
            # The scheduler is not prepared: accelerate would step it once per process.
            self.wrapped, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        self.module = self.accelerator.unwrap_model(self.wrapped)
        self.model = self.module
        self.trainable = {n: p for n, p in self.module.named_parameters() if p.requires_grad}
        if self.reference is not None and not self.sharded:  # the frozen reference runs beside the policy
            self.reference.to(self.accelerator.device)

    @property
    def sharded(self) -> bool:
        return self.strategy == "fsdp"

    @property
    def writes_files(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def world_size(self) -> int:
        return self.accelerator.num_processes

    def all_agree(self, ok: bool) -> bool:
        import torch.distributed as dist

        flag = torch.tensor([int(ok)], device=self.accelerator.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def model_device(self, model_cfg: Any, train_cfg: Any) -> torch.device:
        """Load on CPU: `accelerator.prepare` puts the model on this process's device (DDP),
        or `shard_model` spreads it over the processes (FSDP2)."""
        return torch.device("cpu")

    def load(self, trainable: bool) -> torch.nn.Module:
        """Under FSDP2 only the first process reads the checkpoint; the others build the model
        on the meta device and receive their shards in `prepare_model`."""
        if self.sharded and not self.accelerator.is_main_process:
            from forge.models.loading import load_model

            return load_model(
                self.model_path,
                self.model_cfg,
                trainable=trainable,
                device=torch.device("meta"),
                attn_implementation=self.attn_implementation,
            )
        return super().load(trainable)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.sharded:
            return model
        float32_reduce = keeps_master_weights(self.train_cfg, model.parameters())
        return shard_from_first_process(
            model,
            self.accelerator.device,
            self.world_size,
            self.mixed_precision,
            float32_reduce=float32_reduce,
        )

    def after_forward_only(self) -> None:
        """FSDP2 keeps the root module's parameters gathered after a forward, for the backward
        that follows; after the self-check's forwards there is none, so shard them again (else
        the model's parameters are no longer the sharded ones the optimizer steps)."""
        if not self.sharded:
            return
        from torch.distributed.fsdp import FSDPModule

        for module in self.model.modules():
            if isinstance(module, FSDPModule):
                module.reshard()

    def _frozen_reference(self) -> Any:
        """Under FSDP2 the KL reference of a full fine-tune is sharded like the policy: each
        process holds 1/N of it. Its forwards are collectives too, entered once per
        micro-batch (padding ones included) by every process."""
        reference = super()._frozen_reference()
        if reference is None or not self.sharded:
            return reference
        device = self.accelerator.device
        return shard_from_first_process(reference, device, self.world_size, self.mixed_precision, frozen=True)

    def train_step(self, samples: list[Sample]) -> dict[str, float]:
        """`samples` is the whole batch (the same list on every process): every process cuts
        the same minibatches from it, and every decision taken from it (to train at all, how
        many optimizer steps) is the same on every process."""
        metrics = super().train_step(samples)
        trained = [s for s in self.last_share if not self._skipped(s)]
        everyone: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(everyone, (metrics, loss_tokens(trained), len(self.last_share)))
        return combine_metrics(everyone)

    def own_share(self, minibatch: list[Sample]) -> list[Sample]:
        """This process's share of each minibatch, split in prefix-tree order (`shard`). A
        process whose share is empty still takes the step, with padding micro-batches."""
        return shard(minibatch, self.accelerator.process_index, self.world_size)

    # Every collective (the loss denominators, DDP's gradient all-reduce and buffer broadcast,
    # FSDP2's all-gathers and reduce-scatters) must be entered by every process the same
    # number of times, or the processes wait on each other forever. So all take the same
    # optimizer steps (decided from the whole batch), even one whose share has nothing to
    # train, and each step runs as many micro-batches as the process that has the most; the
    # others make up the count with padding micro-batches.
    def microbatches_to_run(self, num_microbatches: int) -> int:
        counts = self.accelerator.gather(torch.tensor([num_microbatches], device=self.accelerator.device))
        return int(counts.max().item())

    def _optimizer_step(self, samples: list[Sample]) -> tuple[dict[str, float], dict[str, float], list[Any]]:
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
        """DDP combines gradients once per step, in the last micro-batch's backward (which
        every process enters together); before it they accumulate locally. Under master
        weights DDP combines none: each process sums its micro-batches in float32 and
        `accumulate_gradients` combines those sums. FSDP2 reduce-scatters every
        micro-batch's gradients, so a process only ever holds its shard of them."""
        if self.sharded or (last and not self.float32_gradients):
            return contextlib.nullcontext()
        return self.accelerator.no_sync(self.wrapped)

    def accumulate_gradients(self, last: bool) -> None:
        """Under DDP with master weights, after the last micro-batch, the processes' float32
        sums are added up in one all-reduce (in float32, where DDP would reduce bfloat16
        gradients) and divided by the process count, as DDP's average is."""
        super().accumulate_gradients(last)
        if not (self.float32_gradients and last) or self.sharded:
            return
        import torch.distributed as dist

        optimizer = self._torch_optimizer()
        params = optimizer.parameters()
        sums = [optimizer.float_gradients.get(p, torch.zeros_like(p, dtype=torch.float32)) for p in params]
        flat = torch.cat([s.reshape(-1) for s in sums])
        dist.all_reduce(flat)
        flat /= self.world_size
        optimizer.float_gradients = {
            p: part.view_as(p)
            for p, part in zip(params, flat.split([p.numel() for p in params]), strict=True)
        }

    def loss_denominators(self, samples: list[Sample]) -> tuple[int, int]:
        local = torch.tensor([loss_tokens(samples), len(samples)], dtype=torch.float32)
        local = local.to(self.accelerator.device)
        total = self.accelerator.reduce(local, reduction="sum")
        return int(total[0].item()), int(total[1].item())

    def backward(self, loss: torch.Tensor) -> None:
        # Each process's loss is its part of the global mean; DDP and FSDP2 average gradients
        # over processes, so scaling by the process count makes that average a sum.
        if self.sharded:
            (loss * self.world_size).backward()
        else:
            self.accelerator.backward(loss * self.world_size)

    def clip_gradients(self) -> torch.Tensor:
        params = list(self.trainable.values())
        if self.float32_gradients:  # the optimizer's float32 sums (under FSDP2, of every process's shard)
            return full_tensor(super().clip_gradients())
        if self.sharded:  # the norm over every process's shard
            return full_tensor(torch.nn.utils.clip_grad_norm_(params, self.train_cfg.max_grad_norm))
        return self.accelerator.clip_grad_norm_(params, self.train_cfg.max_grad_norm)

    def whole_state(self, names: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        """The model's state (or the tensors in `names`) whole and on CPU for the first
        process, an empty dict for the others. Under FSDP2 every process must call it: each
        tensor is gathered from all of them."""
        main = self.accelerator.is_main_process
        if not (main or self.sharded):
            return {}
        state = self.module.state_dict()
        out = {}
        for name in state if names is None else [n for n in names if n in state]:
            tensor = full_tensor(state[name]).detach()
            if main:
                out[name] = tensor.cpu().clone()
        return out

    def weights(self) -> dict[str, torch.Tensor]:
        """The first process gets the trainable tensors whole; the others an empty dict."""
        return self.whole_state(self.trainable)

    def publish_weights(self) -> tuple[list[Any], int]:
        if self.accelerator.is_main_process:
            return super().publish_weights()
        self.weights()  # its part of the gather
        return [], self.policy_version

    def save(self, directory: str | Path) -> str:
        """Under DDP the first process saves its model. Under FSDP2 the processes gather
        the whole state, and the first loads it into an unsharded copy of the model and
        saves that."""
        main = self.accelerator.is_main_process
        if not self.sharded:
            return super().save(directory) if main else str(directory)
        state = self.whole_state()
        if not main:
            return str(directory)
        from forge.models.loading import load_model

        whole = load_model(
            self.model_path,
            self.model_cfg,
            trainable=True,
            device=torch.device("cpu"),
            attn_implementation=self.attn_implementation,
        )
        whole.load_state_dict(state)
        return self.save_model(whole, directory)

    def save_state(self, directory: str) -> None:
        super().save_state(directory)
        self.accelerator.wait_for_everyone()  # the file is whole before any process returns

    def close(self) -> None:
        """Leave the process group (every process together); a process that exits while its
        group's threads still run can abort.

        After the last collective completes, a gloo worker thread still has to free its work,
        which takes the GIL. If the group were freed at that moment (its destructor joins the
        workers while holding the GIL), both would wait forever: seen once as a bench rank
        hung in ~ProcessGroupGloo. Sleeping releases the GIL, so the workers finish first."""
        self.accelerator.wait_for_everyone()
        time.sleep(0.05)
        torch.distributed.destroy_process_group()

    def _torch_optimizer(self) -> torch.optim.Optimizer:
        return getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it under DDP
