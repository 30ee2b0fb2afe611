"""A vLLM server that dies or stalls during a full-weight update (vLLM's NCCL weight
transfer): every step, the trainer's NCCL rendezvous and broadcast included, ends within
rollout.engine_timeout_s; the server is dropped naming its URL, the others take the version
in a new group, it comes back through re-admission; with every server stalled the run stops
(exit 1), it never hangs. NCCL itself is faked (no GPU here): the trainer's side runs the real
`vllm_transfer.trainer_join` / `trainer_send` on one thread, as in its Ray actor, over a
fake communicator whose broadcast blocks until every member takes part or it is aborted."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from forge.rollout.engines import remote, vllm_transfer
from forge.rollout.engines.server_keys import NO_KEYS

VLLM = json.loads((Path(__file__).parent / "fixtures" / "engines" / "vllm.json").read_text())
TIMEOUT_S = 1.0  # rollout.engine_timeout_s in these tests


class Group:
    """One fake NCCL group: formed once all `world` ranks joined; broadcast round r ends once
    rank 0 sent it and every other rank arrived at it, or never, if the group is aborted."""

    def __init__(self, world: int) -> None:
        self.world = world
        self.joined: set[int] = set()
        self.arrived: dict[int, set[int]] = {}
        self.sent = 0
        self.aborted = threading.Event()
        self.lock = threading.Lock()

    def formed(self) -> bool:
        return len(self.joined) == self.world

    def done(self, r: int) -> bool:
        return self.sent > r and len(self.arrived.get(r, ())) == self.world - 1

    def arrive(self, r: int, rank: int) -> None:
        with self.lock:
            self.arrived.setdefault(r, set()).add(rank)


class Fleet:
    """The fake NCCL world the trainer and the fake vLLM servers share, by master port."""

    def __init__(self) -> None:
        self.groups: dict[int, Group] = {}
        self.lock = threading.Lock()
        self.closed = threading.Event()  # set at a test's end: nothing waits past it
        self.aborts = 0
        self.pending: tuple[Group, int] | None = None  # the broadcast rank 0 enqueued last

    def group(self, port: int, world: int) -> Group:
        with self.lock:
            return self.groups.setdefault(port, Group(world))

    def wait(self, ready) -> bool:
        """Block (a trainer thread) until `ready()`; False if the test ended first."""
        while not ready():
            if self.closed.wait(0.005):
                return False
        return True

    def engine(self) -> type:
        """What `vllm_transfer._nccl_engine()` returns: vLLM's NCCLWeightTransferEngine's two
        trainer-side calls, over this fleet."""
        fleet = self

        class Comm:
            """Stands for vLLM's PyNcclCommunicator: `broadcast` enqueues; `nccl.lib.ncclCommAbort`."""

            def __init__(self, group: Group) -> None:
                self.group, self.comm = group, object()
                self.nccl = SimpleNamespace(lib=SimpleNamespace(ncclCommAbort=self._abort))

            def _abort(self, handle: object) -> int:
                assert handle is self.comm
                fleet.aborts += 1
                self.group.aborted.set()
                return 0

            def broadcast(self, tensor, src: int, stream=None) -> None:
                fleet.pending = (self.group, self.group.sent)
                self.group.sent += 1

        class Engine:
            @staticmethod
            def trainer_init(info: dict) -> Comm:
                group = fleet.group(info["master_port"], info["world_size"])
                with group.lock:
                    group.joined.add(0)
                fleet.wait(group.formed)  # the rendezvous: until every rank joined
                return Comm(group)

            @staticmethod
            def trainer_send_weights(iterator, args: dict) -> None:
                packed = [tensor for _, tensor in iterator]  # vLLM packs, then broadcasts
                args["group"].broadcast(packed, src=0)
                group, r = fleet.pending
                # vLLM then waits on the CUDA stream the broadcast runs on.
                fleet.wait(lambda: group.done(r) or group.aborted.is_set())
                if not group.done(r):
                    raise RuntimeError("NCCL error: the communicator was aborted")

        return Engine


class Server:
    """A vLLM server behind an httpx transport: recorded answers, its one rank's part in the
    fleet's groups, and `stall_from`: the route at which it stops answering anything (each
    request then runs into the client's timeout, as with a hung server); `stick_from`: the
    route at which its engine gets stuck, while its API server still answers GET /health
    (vLLM serves /health apart from the engine)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.stall_from: str | None = None
        self.stalled = False
        self.stick_from: str | None = None
        self.stuck = False
        self.group: Group | None = None
        self.rank = 0
        self.rounds = 0
        self.version: str | None = None
        self.seen: list[str] = []

    def recover(self) -> None:
        """Restarted: it answers again, from its checkpoint, outside any group."""
        self.stall_from, self.stalled, self.group, self.version = None, False, None, None
        self.stick_from, self.stuck = None, False

    def transport(self) -> httpx.MockTransport:
        recorded = {
            VLLM[name]["path"]: VLLM[name]["response"]
            for name in (
                "get_world_size",
                "init_weight_transfer_engine",
                "pause",
                "start_weight_update",
                "update_weights",
                "finish_weight_update",
                "resume",
            )
        }

        async def until(request: httpx.Request, ready) -> None:
            deadline = time.monotonic() + request.extensions["timeout"]["read"]
            while not ready():
                if time.monotonic() >= deadline:
                    raise httpx.ReadTimeout("timed out", request=request)
                await asyncio.sleep(0.005)

        async def handle(request: httpx.Request) -> httpx.Response:
            path = request.url.path
            self.seen.append(path)
            self.stalled = self.stalled or path == self.stall_from
            self.stuck = self.stuck or path == self.stick_from
            if self.stalled or (self.stuck and path != "/health"):
                await until(request, lambda: False)
            if path == "/health":
                return httpx.Response(200, text="")
            body = json.loads(request.content) if request.content else {}
            if path == "/init_weight_transfer_engine":
                info = body["init_info"]
                self.group, self.rank, self.rounds = (
                    self.fleet.group(info["master_port"], info["world_size"]),
                    info["rank_offset"],
                    0,
                )
                with self.group.lock:
                    self.group.joined.add(self.rank)
                await until(request, self.group.formed)
            elif path == "/update_weights":
                group, r = self.group, self.rounds
                self.rounds += 1
                group.arrive(r, self.rank)
                await until(request, lambda: group.done(r) or group.aborted.is_set())
                if not group.done(r):  # the trainer aborted the group this rank waited in
                    return httpx.Response(500, json={"detail": "NCCL error: remote process exited"})
            elif path == "/finish_weight_update":
                self.version = body["weight_version"]
            elif path == "/weight_info":
                return httpx.Response(200, json={"weight_version": self.version})
            return httpx.Response(200, json=recorded[path])

        return httpx.MockTransport(handle)


class TrainerActor:
    """The trainer as a Ray actor is to the driver: `__ray_call__.remote(fn, *args)` runs
    `fn(trainer, *args)` on its one thread, one call at a time, and returns an awaitable."""

    def __init__(self) -> None:
        import torch

        self.thread = ThreadPoolExecutor(max_workers=1)
        self.model = torch.nn.Linear(2, 2)
        self.trainable = {"weight", "bias"}
        self.joined: list[tuple[int, int]] = []  # (world, port) of each group it formed
        actor = self

        class Call:
            @staticmethod
            def remote(fn, *args):
                if fn is vllm_transfer.trainer_join:
                    actor.joined.append((args[2], args[1]))
                return asyncio.wrap_future(actor.thread.submit(fn, actor, *args))

        self.__ray_call__ = Call()

    def answers_within(self, seconds: float) -> bool:
        """Whether a call made now runs within `seconds` (none is stuck ahead of it)."""
        future = self.thread.submit(lambda: True)
        try:
            return future.result(timeout=seconds)
        except TimeoutError:
            return False


@pytest.fixture
def world(monkeypatch):
    """A fleet, two vLLM servers a and b on it, the trainer, and the driver's pool over them."""
    import ray

    from forge.config import load_config
    from forge.rollout.engines import clients, health
    from forge.rollout.engines.pool import EnginePool

    fleet = Fleet()
    servers = {url: Server(fleet) for url in ("vllm+http://a:8000", "vllm+http://b:8000")}
    real = clients.make_client

    def make_client(spec: str, model: str, sampling, timeout_s: float = 120.0, keys=NO_KEYS):
        client = real(spec, model, sampling, timeout_s, keys)
        client.http = remote.HttpTransport(client.url, timeout_s, servers[spec].transport())
        client.http.busy_retry_delays_s = ()
        return client

    monkeypatch.setattr(clients, "make_client", make_client)
    monkeypatch.setattr(ray, "get", lambda ref, **_: ref)
    monkeypatch.setattr(health, "READMIT_FIRST_WAIT_S", 0.0)
    monkeypatch.setattr(remote, "PROBE_TIMEOUT_S", 0.2)  # GET /health of a hung server
    monkeypatch.setattr(vllm_transfer, "_nccl_engine", fleet.engine)
    monkeypatch.setattr(vllm_transfer, "ABORT_GRACE_S", 2.0, raising=False)
    monkeypatch.setattr(vllm_transfer, "COLLECTIVE_GRACE_S", 2.0)
    cfg = load_config(
        "configs/smoke.yaml",
        [
            "rollout.engine=remote",
            f"rollout.servers=[{','.join(servers)}]",
            "train.mode=sync",
            "train.num_gpus=1",
            f"rollout.engine_timeout_s={TIMEOUT_S}",
        ],
    )
    trainer = TrainerActor()
    yield SimpleNamespace(
        pool=EnginePool(list(servers), [], cfg), servers=servers, trainer=trainer, fleet=fleet
    )
    fleet.closed.set()  # a trainer thread left waiting (the code under test regressed) ends
    trainer.thread.shutdown(wait=False)


@pytest.mark.timeout(60)
def test_a_vllm_server_that_stalls_mid_broadcast_is_dropped_and_the_others_take_the_version(world, capsys):
    a, b = "vllm+http://a:8000", "vllm+http://b:8000"
    world.pool.sync([None], 1, world.trainer)
    assert world.pool.holders(1) == [a, b] and [w for w, _ in world.trainer.joined] == [3]

    world.servers[b].stall_from = "/update_weights"  # it hangs once the broadcast starts
    started = time.monotonic()
    world.pool.sync([None], 2, world.trainer)
    took = time.monotonic() - started
    # The broadcast and b's resume each wait out the timeout; then a takes version 2 alone.
    assert took < 4 * TIMEOUT_S + 10.0, took  # bounded, not a hang (slack for a loaded CI machine)
    assert world.pool.holders(2) == [a] and b in world.pool.dead
    assert world.fleet.aborts == 1  # the trainer aborted the group it was stuck in
    assert [w for w, _ in world.trainer.joined] == [3, 2]  # a new group: the trainer and a
    assert world.servers[a].version == "2"
    assert world.trainer.answers_within(5.0)  # the trainer's next call (a training step) runs
    console = capsys.readouterr().err
    assert (
        f"engine {b} lost (it stalled the vLLM weight transfer at the NCCL weight broadcast (/update_weights)"
        in console
    )
    assert "the others take version 2 in a new NCCL group without it); 1 of 2 engines remain" in console

    world.servers[b].recover()  # restarted: it answers again
    world.pool.sync([None], 3, world.trainer)
    assert world.pool.holders(3) == [a, b] and world.pool.readmitted == 1
    (w1, port1), (w2, port2), (w3, port3) = world.trainer.joined
    assert w3 == 3 and len({port1, port2, port3}) == 3  # each group formed afresh, on its own port
    assert world.servers[b].version == "3"
    assert (
        f"engine {b} took weights version 3 and serves again (2 of 2 engines live)" in capsys.readouterr().err
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("route", ["/pause", "/update_weights", "/finish_weight_update"])
def test_a_vllm_server_whose_engine_sticks_while_its_health_answers_is_dropped_alone(world, route, capsys):
    """b's GET /health answers, but its engine no longer answers from `route` on (a step each
    server takes alone, or the broadcast, where a answered once the trainer gave up). b alone
    is dropped, naming it; a takes the version in a group without it; b comes back through
    re-admission once restarted. On main every server was dropped (no cause found)."""
    a, b = "vllm+http://a:8000", "vllm+http://b:8000"
    world.pool.sync([None], 1, world.trainer)
    world.servers[b].stick_from = route
    world.pool.sync([None], 2, world.trainer)
    assert world.pool.holders(2) == [a] and list(world.pool.dead) == [b]
    assert world.servers[a].version == "2"
    assert world.trainer.answers_within(5.0)
    console = capsys.readouterr().err
    assert f"engine {b} lost (it " in console and "though it answers GET /health" in console
    assert f"engine {a} lost" not in console

    world.servers[b].recover()
    world.pool.sync([None], 3, world.trainer)
    assert world.pool.holders(3) == [a, b] and world.pool.readmitted == 1
    assert world.servers[b].version == "3"


@pytest.mark.timeout(60)
def test_a_vllm_server_that_stalls_while_the_group_forms_is_dropped_and_the_others_form_one_without_it(world):
    """The rendezvous waits for every rank: one that never joins held the trainer's
    trainer_init forever."""
    a, b = "vllm+http://a:8000", "vllm+http://b:8000"
    world.servers[b].stall_from = "/init_weight_transfer_engine"
    world.pool.sync([None], 1, world.trainer)
    assert world.pool.holders(1) == [a] and b in world.pool.dead
    assert [w for w, _ in world.trainer.joined] == [3, 2]
    assert world.trainer.answers_within(5.0)


@pytest.mark.timeout(60)
def test_a_sync_in_which_every_vllm_server_stalls_stops_the_run_with_exit_1_not_a_hang(
    world, monkeypatch, capsys
):
    from forge.cli import main
    from forge.run import launch

    world.pool.sync([None], 1, world.trainer)
    for server in world.servers.values():
        server.stall_from = "/update_weights"

    def train(cfg, resume: bool = False, overwrite: bool = False):
        world.pool.sync([None], 2, world.trainer)  # a run's next weight sync

    monkeypatch.setattr(launch, "train", train)
    started = time.monotonic()
    assert main(["train", "configs/smoke.yaml"]) == 1
    assert time.monotonic() - started < 6 * TIMEOUT_S + 10.0
    assert world.fleet.aborts == 1 and world.trainer.answers_within(5.0)  # the next step would run
    console = capsys.readouterr().err
    assert "it stalled the vLLM weight transfer at the NCCL weight broadcast" in console
    assert (
        "forge: all 2 inference servers are lost and none answered again within rollout.engine_timeout_s=1s"
        in console
    )


def test_the_trainers_broadcast_in_a_group_a_member_never_joins_ends_at_its_timeout_aborting_the_group(
    monkeypatch,
):
    """On the trainer alone: `trainer_send` returns (raising) within its timeout, the
    communicator aborted and never used again."""
    fleet = Fleet()
    monkeypatch.setattr(vllm_transfer, "_nccl_engine", fleet.engine)
    trainer = TrainerActor()
    group = fleet.group(1, 2)
    group.joined.update({0, 1})
    comm = fleet.engine().trainer_init({"master_port": 1, "world_size": 2})
    trainer._vllm_group = vllm_transfer.AbortableGroup(comm)
    started = time.monotonic()
    try:
        with pytest.raises(vllm_transfer.TransferTimeout, match=r"did not finish within 0.3s"):
            vllm_transfer.trainer_send(trainer, 0.3)
    finally:
        fleet.closed.set()
    assert time.monotonic() - started < 10.0  # at its timeout, not at the test's 60 s
    assert fleet.aborts == 1 and trainer._vllm_group is None
    with pytest.raises(RuntimeError, match="no weight-transfer group"):
        vllm_transfer.trainer_send(trainer, 0.3)


def test_a_group_the_trainer_gave_up_forming_is_aborted_if_it_forms_later(monkeypatch):
    """A rendezvous has no communicator to abort while it waits: the trainer stops waiting
    at its timeout, and the communicator it forms after that is aborted, never used."""
    fleet = Fleet()
    monkeypatch.setattr(vllm_transfer, "_nccl_engine", fleet.engine)
    trainer = TrainerActor()
    try:
        started = time.monotonic()
        with pytest.raises(vllm_transfer.TransferTimeout, match="forming the NCCL weight-transfer group"):
            vllm_transfer.trainer_join(trainer, "127.0.0.1", 2, 2, 0.2)
        assert time.monotonic() - started < 10.0  # no wait for a thread nothing could end
        assert trainer._vllm_group is None and fleet.aborts == 0
        fleet.group(2, 2).joined.add(1)  # the late server joins after all
        deadline = time.monotonic() + 5.0
        while fleet.aborts == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fleet.aborts == 1 and trainer._vllm_group is None
    finally:
        fleet.closed.set()
        trainer.thread.shutdown(wait=False)
