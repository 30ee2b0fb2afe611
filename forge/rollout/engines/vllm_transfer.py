"""New full weights for vLLM servers through vLLM's NCCL weight transfer: the trainer is
rank 0 of one group with every server's inference ranks; each update is pause, start,
`update_weights` on every server while the trainer broadcasts, finish (with the version),
resume.

Written against vLLM's documented HTTP control plane and trainer-side API
(`vllm.distributed.weight_transfer.nccl_engine.NCCLWeightTransferEngine.trainer_init` /
`trainer_send_weights`, examples/rl/rlhf_http_nccl.py); the HTTP side is checked against
recorded shapes only, never against a running vLLM (there is none, and no GPU, here).

Every step ends within rollout.engine_timeout_s, so a server that dies or hangs mid-update
never blocks the run: the servers' calls by their HTTP timeout, the trainer's rendezvous and
broadcast by running on a thread the trainer stops waiting for (aborting the communicator).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from forge.env.output import console


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


# -- the trainer's side, run inside the trainer actor through Ray's `__ray_call__` -------------
# An NCCL call whose peer died or stalls never returns, and the actor runs one call at a time:
# a broadcast blocked in it would hold every later call (the next training step included)
# forever. So each collective runs on a thread of its own while the actor's call waits at most
# `timeout_s` for it; past that the communicator is aborted and the call raises.
# Why the abort frees the thread: ncclCommAbort sets the communicator's abort flag, which NCCL's
# kernels and its host-side waits poll, so the stuck broadcast kernel ends, the stream it ran on
# completes, and vLLM's sender, waiting on that stream (`stream.synchronize()`), returns or raises
# (PyTorch's ProcessGroupNCCL watchdog ends timed-out collectives the same way). An aborted
# communicator is freed: it is never used again (`AbortableGroup`), the driver forms a new group.
ABORT_GRACE_S = 10.0  # how long the trainer waits for an aborted broadcast's thread to end


# A server's part of a collective step (the group's forming, the broadcast) is waited for this
# much past the trainer's own timeout: a server that was only waiting on a stalled one and ends
# once the trainer aborts the group then answers before the stalled one's call times out, which
# tells the two apart (the pool drops only the one that never answered).
COLLECTIVE_GRACE_S = 5.0


class TransferTimeout(TimeoutError):
    """The trainer's side of a weight transfer did not finish within its time."""


class AbortableGroup:
    """vLLM's PyNcclCommunicator as its sender sees it (`broadcast`), plus `abort`: after an
    abort every broadcast raises instead of touching the freed communicator."""

    def __init__(self, comm: Any) -> None:
        self.comm = comm
        self.aborted = False
        self._lock = threading.Lock()

    def broadcast(self, tensor: Any, *args: Any, **kwargs: Any) -> None:
        with self._lock:  # held only while NCCL enqueues the broadcast, not while it runs
            if self.aborted:
                raise TransferTimeout("the weight-transfer group was aborted")
            self.comm.broadcast(tensor, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else vLLM's sender asks of its group
        return getattr(self.comm, name)

    def abort(self) -> None:
        # An enqueue holds the lock for microseconds; one holding it longer is itself blocked
        # on a dead peer (NCCL connects lazily, at the first collective), which the abort ends.
        held = self._lock.acquire(timeout=1.0)
        try:
            if self.aborted:
                return
            self.aborted = True
            # vLLM's NCCL wrapper lists no ncclCommAbort; its ctypes library handle has every symbol.
            self.comm.nccl.lib.ncclCommAbort(self.comm.comm)
        finally:
            if held:
                self._lock.release()


def _bounded(
    work: Callable[[], Any], timeout_s: float, abort: Callable[[], None], what: str, ends_it: bool = True
) -> Any:
    """`work()` on a thread of its own; its result, or its error; if it has not ended after
    `timeout_s`, `abort()` (with `ends_it`, then wait ABORT_GRACE_S for the thread to end)
    and raise TransferTimeout (the thread, if still blocked, is left)."""
    import torch

    device = torch.cuda.current_device() if torch.cuda.is_available() else None
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            if device is not None:  # the CUDA device is per thread
                torch.cuda.set_device(device)
            outcome["value"] = work()
        except BaseException as exc:  # handed to the waiting call
            outcome["error"] = exc

    thread = threading.Thread(target=run, name=f"forge-{what}", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        abort()
        if ends_it:
            thread.join(ABORT_GRACE_S)
        raise TransferTimeout(
            f"{what} did not finish within {timeout_s:g}s (rollout.engine_timeout_s): a vLLM server died or "
            "stalls in it; the group is aborted"
        )
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def trainer_join(
    trainer: Any, host: str, port: int, world_size: int, timeout_s: float = 600.0
) -> tuple[list[str], list[str], list[list[int]]]:
    """Rank 0 of a new group (waits up to `timeout_s` for the servers to join); returns the
    weights' metadata. The last group, if any, is never used again."""
    trainer._vllm_group = None
    formed: dict[str, Any] = {"abandoned": False}
    lock = threading.Lock()

    def form() -> AbortableGroup:
        group = AbortableGroup(
            _nccl_engine().trainer_init(
                {"master_address": host, "master_port": port, "world_size": world_size}
            )
        )
        with lock:
            if formed["abandoned"]:  # formed after its caller gave up: its members went on without it
                group.abort()
                raise TransferTimeout("the group formed after its caller gave up on it")
        return group

    def abandon() -> None:
        # A rendezvous has no communicator to abort yet: the thread is left to end by itself
        # (vLLM's TCP store gives up after its own timeout), and what it forms is aborted.
        with lock:
            formed["abandoned"] = True

    trainer._vllm_group = _bounded(
        form, timeout_s, abandon, "forming the NCCL weight-transfer group", ends_it=False
    )
    return weight_metadata(_device_weights(trainer))


def trainer_send(trainer: Any, timeout_s: float = 600.0) -> None:
    """Broadcast the weights to the group, within `timeout_s`; after a failure the group is
    never used again."""
    group = trainer._vllm_group
    if group is None:
        raise RuntimeError("no weight-transfer group to send on (the last one failed): form one first")
    state = _device_weights(trainer)
    weights = iter((name, state[name]) for name in sorted(state))
    try:
        _bounded(
            lambda: _nccl_engine().trainer_send_weights(weights, {"group": group, "packed": True}),
            timeout_s,
            group.abort,
            "the NCCL weight broadcast",
        )
    except BaseException:
        trainer._vllm_group = None
        raise


class WeightTransferFailed(RuntimeError):
    """An update that did not finish at `step`. `failed`: each server (by URL) whose own call
    failed, and its error; `trainer`: the trainer side's error, if it had one; `collective`:
    whether the step was one the servers and the trainer take together (the group's forming,
    the broadcast), where a server waiting on one that never came fails too, so its failure
    alone does not say who stalled it. At any other step each call is the server's own."""

    def __init__(
        self,
        step: str,
        failed: dict[str, BaseException],
        trainer: BaseException | None,
        collective: bool = False,
    ) -> None:
        said = [f"{url}: {type(exc).__name__}: {str(exc)[:200]}" for url, exc in failed.items()]
        if trainer is not None:
            said.append(f"trainer: {type(trainer).__name__}: {str(trainer)[:300]}")
        super().__init__(f"{step} failed ({'; '.join(said)})")
        self.step, self.failed, self.trainer, self.collective = step, failed, trainer, collective


async def _each(
    step: str, clients: list[Any], calls: list[Any], trainer: Any = None
) -> tuple[Any, list[Any]]:
    """Await the trainer's side (if any) and one call per client, all at once and each to its
    end (every one is bounded by rollout.engine_timeout_s): (the trainer's result, the
    clients' in order), or WeightTransferFailed naming each that failed."""
    sides = [trainer] if trainer is not None else []
    outcomes = await asyncio.gather(*sides, *calls, return_exceptions=True)
    trainer_error = outcomes[0] if sides and isinstance(outcomes[0], BaseException) else None
    answers = outcomes[len(sides) :]
    failed = {c.url: a for c, a in zip(clients, answers, strict=True) if isinstance(a, BaseException)}
    if failed or trainer_error is not None:
        raise WeightTransferFailed(step, failed, trainer_error, collective=bool(sides))
    return (outcomes[0] if sides else None), answers


class VLLMWeightTransfer:
    """The driver's side: forms the group at the first update (again after a server is
    lost: an NCCL group cannot shrink) and runs each update on every server at once.

    `join(host, port, world)` and `send()` are awaitables the trainer runs (Ray refs of
    `trainer_join` / `trainer_send` in a run, each bounded by rollout.engine_timeout_s there;
    plain coroutines in tests)."""

    def __init__(self, join: Any, send: Any, address: Any) -> None:
        self.join, self.send, self.address = join, send, address
        self.members: list[str] | None = None
        self.metadata: tuple[list[str], list[str], list[list[int]]] | None = None
        self.version: int | None = None  # the last version every member took
        self.reporting: set[str] = set()  # members whose /weight_info says the version they hold

    async def update(self, clients: list[Any], version: int) -> None:
        """Get `version` to every client. Raises WeightTransferFailed if any step fails: the
        servers are then resumed but their weights may be part old, part new (the caller
        drops them, or updates those that still answer again), and the group is formed
        afresh next time. A member that restarted since the last update (it left the group,
        and holds its checkpoint's weights again) is found by the version it reports, and
        the group is formed afresh with it."""
        try:
            if self.members == [c.url for c in clients] and await self._restarted(clients):
                self.members = None
            if self.members != [c.url for c in clients]:
                await self._form(clients)
            try:
                await _each(
                    "/pause and /start_weight_update", clients, [c.begin_weight_update() for c in clients]
                )
                names, dtypes, shapes = self.metadata
                await _each(
                    "the NCCL weight broadcast (/update_weights)",
                    clients,
                    [c.receive_weights(names, dtypes, shapes, COLLECTIVE_GRACE_S) for c in clients],
                    trainer=self.send(),
                )
            except BaseException:
                await asyncio.gather(*(c.resume() for c in clients), return_exceptions=True)
                raise
            await _each(
                "/finish_weight_update and /resume", clients, [c.end_weight_update(version) for c in clients]
            )
        except BaseException:
            self.members = None
            raise
        self.version = version
        self.reporting = {c.url for c in clients if getattr(c, "reports_version", False)}

    async def _restarted(self, clients: list[Any]) -> bool:
        """Whether a member says it holds other weights than the last version sent (vLLM
        servers with /weight_info: None once restarted); says which on the console."""
        asked = [c for c in clients if c.url in self.reporting]
        _, said = await _each("GET /weight_info", asked, [c.served_version() for c in asked])
        gone = [
            (c.url, held)
            for c, (known, held) in zip(asked, said, strict=True)
            if known and held != str(self.version)
        ]
        for url, held in gone:
            print(
                f"forge: vLLM server {url} holds weights {held!r}, not version {self.version} (restarted?): "
                "forming the weight-transfer group afresh",
                file=console(),
                flush=True,
            )
        return bool(gone)

    async def _form(self, clients: list[Any]) -> None:
        _, sizes = await _each("GET /get_world_size", clients, [c.world_size() for c in clients])
        host, port = await self.address()
        world = 1 + sum(sizes)
        offsets = [1 + sum(sizes[:i]) for i in range(len(clients))]
        self.metadata, _ = await _each(
            "forming the NCCL group (/init_weight_transfer_engine)",
            clients,
            [
                c.init_weight_transfer(host, port, offset, world, COLLECTIVE_GRACE_S)
                for c, offset in zip(clients, offsets, strict=True)
            ],
            trainer=self.join(host, port, world),
        )
        self.members = [c.url for c in clients]
