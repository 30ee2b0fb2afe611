"""Weights by broadcast: a process group of the trainer (rank 0) and the engines, built
from its own TCP store so that it stays apart from any default group the trainer already
has (data-parallel ranks). Gloo, the tensors through host memory; each tensor is broadcast
straight into the engines' own weights.

Every wait in it, the rendezvous and each broadcast, ends within the timeout it is built with
(rollout.engine_timeout_s in a run): gloo enforces it itself, so a member that died or stalls
costs the others that long, then `BroadcastFailed`, never a hang."""

from __future__ import annotations

import datetime
import socket
from typing import Any

import torch
import torch.distributed as dist


class BroadcastFailed(RuntimeError):
    """The group's rendezvous or a broadcast in it failed or timed out (a member died, stalls,
    or left). The group is unusable from then on: gloo's connections may be left mid-message,
    so a later broadcast could read the failed one's bytes; a new group is formed instead."""


class WeightGroup:
    """One end of the group. Every member must construct it at the same time (the
    constructor waits up to `timeout_s` for all `world_size` of them); each broadcast waits
    up to `timeout_s` too. A failure of either raises BroadcastFailed."""

    def __init__(self, host: str, port: int, rank: int, world_size: int, timeout_s: float = 600.0) -> None:
        timeout = datetime.timedelta(seconds=timeout_s)
        self.rank = rank
        try:
            self.store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
            self.group = dist.ProcessGroupGloo(self.store, rank, world_size, timeout)
        except Exception as exc:  # gloo/c10d raise RuntimeError and DistStoreError alike
            raise BroadcastFailed(
                f"forming the weight broadcast group (rank {rank} of {world_size}) failed: "
                f"{type(exc).__name__}: {str(exc)[:300]}"
            ) from None

    def _broadcast(self, tensor: torch.Tensor) -> None:
        options = dist.BroadcastOptions()
        options.rootRank = 0
        try:
            self.group.broadcast([tensor], options).wait()
        except Exception as exc:
            raise BroadcastFailed(
                f"a weight broadcast (rank {self.rank}) failed: {type(exc).__name__}: {str(exc)[:300]}"
            ) from None

    def send(self, state: dict[str, torch.Tensor], names: list[str]) -> None:
        """Rank 0: broadcast `state[name]` for each name, in order."""
        for name in names:
            self._broadcast(state[name].detach().to("cpu").contiguous())

    def receive(self, targets: dict[str, torch.Tensor], names: list[str]) -> None:
        """Other ranks: receive each named tensor into `targets[name]` (in place)."""
        with torch.no_grad():
            for name in names:
                if name not in targets:
                    raise ValueError(f"weight broadcast sends {name!r}, which this engine's model lacks")
                target = targets[name]
                if target.is_contiguous() and target.device.type == "cpu":
                    self._broadcast(target)
                else:
                    buffer = torch.empty(target.shape, dtype=target.dtype)
                    self._broadcast(buffer)
                    target.copy_(buffer)


def open_address() -> tuple[str, int]:
    """This node's address and a free port on it, for rank 0 to listen on."""
    with socket.socket() as probe:
        probe.bind(("", 0))
        port = probe.getsockname()[1]
    host = socket.gethostbyname(socket.gethostname())
    return host, port


# Run inside the trainer actor through Ray's `__ray_call__` (the trainer has no method of
# its own for this; these read its `weights()`).
def trainer_address(trainer: Any) -> tuple[str, int]:
    return open_address()


def trainer_join(trainer: Any, host: str, port: int, world_size: int, timeout_s: float = 600.0) -> list[str]:
    """Rank 0 of a new group (the last one, if any, is never used again); the names to send."""
    trainer._weight_group = None
    trainer._weight_group = WeightGroup(host, port, 0, world_size, timeout_s)
    return sorted(trainer.weights())


def trainer_send(trainer: Any, names: list[str]) -> None:
    """Broadcast the weights `names` to the group; after a failure the group is dropped."""
    group = trainer._weight_group
    if group is None:
        raise BroadcastFailed("no weight broadcast group to send on (the last one failed): form one first")
    try:
        group.send(trainer.weights(), names)
    except BaseException:
        trainer._weight_group = None
        raise


def trainer_save(trainer: Any, path: str) -> str:
    """The trainer's current weights (`weights()`) as one safetensors file in folder `path`."""
    from pathlib import Path

    from safetensors.torch import save_file

    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {name: t.contiguous() for name, t in trainer.weights().items()}, str(folder / "model.safetensors")
    )
    return str(folder)
