"""New full weights for vLLM servers through vLLM's NCCL weight transfer: the trainer is
rank 0 of one group with every server's inference ranks; each update is pause, start,
`update_weights` on every server while the trainer broadcasts, finish (with the version),
resume.

Written against vLLM's documented HTTP control plane and trainer-side API
(`vllm.distributed.weight_transfer.nccl_engine.NCCLWeightTransferEngine.trainer_init` /
`trainer_send_weights`, examples/rl/rlhf_http_nccl.py); the HTTP side is checked against
recorded shapes only, never against a running vLLM (there is none, and no GPU, here).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any


def weight_metadata(state: dict[str, Any]) -> tuple[list[str], list[str], list[list[int]]]:
    """Names, dtype names and shapes in send order, as `/update_weights` wants them."""
    names = sorted(state)
    return (
        names,
        [str(state[n].dtype).removeprefix("torch.") for n in names],
        [list(state[n].shape) for n in names],
    )


def _device_weights(trainer: Any) -> dict[str, Any]:
    """The trainer's weights where they live (GPU: NCCL sends from device memory), by the
    Hugging Face names vLLM loads checkpoints by."""
    state = trainer.model.state_dict()
    return {name: state[name].detach() for name in trainer.trainable if name in state}


def _nccl_engine() -> Any:
    try:
        from vllm.distributed.weight_transfer.nccl_engine import NCCLWeightTransferEngine
    except ImportError as exc:
        raise RuntimeError(
            "vllm+ servers get new weights by vLLM's NCCL weight transfer, which needs vllm (the servers' "
            f"version) installed where the trainer runs, and the trainer on a GPU ({exc})"
        ) from None
    return NCCLWeightTransferEngine


# Run inside the trainer actor through Ray's `__ray_call__`.
def trainer_join(
    trainer: Any, host: str, port: int, world_size: int
) -> tuple[list[str], list[str], list[list[int]]]:
    """Rank 0 of the group (blocks until the servers join); returns the weights' metadata."""
    trainer._vllm_group = _nccl_engine().trainer_init(
        {"master_address": host, "master_port": port, "world_size": world_size}
    )
    return weight_metadata(_device_weights(trainer))


def trainer_send(trainer: Any) -> None:
    state = _device_weights(trainer)
    _nccl_engine().trainer_send_weights(
        iter((name, state[name]) for name in sorted(state)), {"group": trainer._vllm_group, "packed": True}
    )


class VLLMWeightTransfer:
    """The driver's side: forms the group at the first update (again after a server is
    lost: an NCCL group cannot shrink) and runs each update on every server at once.

    `join` and `send` are awaitables the trainer runs (Ray refs of `trainer_join` /
    `trainer_send` in a run; plain coroutines in tests)."""

    def __init__(self, join: Any, send: Any, address: Any) -> None:
        self.join, self.send, self.address = join, send, address
        self.members: list[str] | None = None
        self.metadata: tuple[list[str], list[str], list[list[int]]] | None = None
        self.version: int | None = None  # the last version every member took
        self.reporting: set[str] = set()  # members whose /weight_info says the version they hold

    async def update(self, clients: list[Any], version: int) -> None:
        """Get `version` to every client. Raises if any step fails: the servers are then
        resumed but their weights may be part old, part new (the caller drops them), and
        the group is formed afresh next time. A member that restarted since the last update
        (it left the group, and holds its checkpoint's weights again) is found by the
        version it reports, and the group is formed afresh with it."""
        try:
            if self.members == [c.url for c in clients] and await self._restarted(clients):
                self.members = None
            if self.members != [c.url for c in clients]:
                await self._form(clients)
            await asyncio.gather(*(c.begin_weight_update() for c in clients))
            names, dtypes, shapes = self.metadata
            try:
                await asyncio.gather(
                    self.send(), *(c.receive_weights(names, dtypes, shapes) for c in clients)
                )
            except BaseException:
                await asyncio.gather(*(c.resume() for c in clients), return_exceptions=True)
                raise
            await asyncio.gather(*(c.end_weight_update(version) for c in clients))
        except BaseException:
            self.members = None
            raise
        self.version = version
        self.reporting = {c.url for c in clients if getattr(c, "reports_version", False)}

    async def _restarted(self, clients: list[Any]) -> bool:
        """Whether a member says it holds other weights than the last version sent (vLLM
        servers with /weight_info: None once restarted); says which on the console."""
        asked = [c for c in clients if c.url in self.reporting]
        said = await asyncio.gather(*(c.served_version() for c in asked))
        gone = [
            (c.url, held)
            for c, (known, held) in zip(asked, said, strict=True)
            if known and held != str(self.version)
        ]
        for url, held in gone:
            print(
                f"forge: vLLM server {url} holds weights {held!r}, not version {self.version} (restarted?): "
                "forming the weight-transfer group afresh",
                file=sys.stderr,
                flush=True,
            )
        return bool(gone)

    async def _form(self, clients: list[Any]) -> None:
        sizes = await asyncio.gather(*(c.world_size() for c in clients))
        host, port = await self.address()
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:i]) for i in range(len(clients))]
        joined = await asyncio.gather(
            self.join(host, port, world),
            *(
                c.init_weight_transfer(host, port, offset, world)
                for c, offset in zip(clients, offsets, strict=True)
            ),
        )
        self.metadata = joined[0]
        self.members = [c.url for c in clients]
