"""Taking back an engine server a rollout worker dropped: between rollouts, once it answers
and holds the current weights (never a restarted server's stale checkpoint stamped as the
current version); the driver giving a lost server that answers again the current weights
(forge serve, vLLM, SGLang); with every engine lost, a bounded wait, then a clear stop."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from pathlib import Path

import httpx
import pytest

from forge.rollout.engines import router as router_module
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.remote import EngineLost, HttpTransport, Sampling, generate_each
from forge.rollout.engines.router import Router
from forge.rollout.engines.server_keys import NO_KEYS
from forge.rollout.engines.sglang_client import SGLangClient
from forge.rollout.engines.vllm_client import VLLMClient

FIXTURES = Path(__file__).parent / "fixtures" / "engines"
VLLM = json.loads((FIXTURES / "vllm.json").read_text())
SGLANG = json.loads((FIXTURES / "sglang.json").read_text())


class Server:
    """An engine client standing for a server that can die, restart from its checkpoint
    (version 0) and be given a version; counts the probes it answers."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.policy_version = 0
        self.up = True
        self.held = 0
        self.probes = 0

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        if not self.up:
            raise EngineLost(self.url, "ConnectError: connection refused")
        return GenerationResult([7], [-0.1], True, self.held, 1)

    async def generate_batch(
        self, requests: list[GenerationRequest], release: list[str] | None = None
    ) -> list:
        return await generate_each(self, requests)

    async def release(self, episode_ids: list[str]) -> None:
        pass

    async def healthy(self) -> bool:
        self.probes += 1
        return self.up

    async def held_version(self, timeout_s: float) -> int | None:
        return self.held

    def restart(self) -> None:
        self.up, self.held = True, 0

    async def close(self) -> None:
        pass


def turn(group: str) -> GenerationRequest:
    return GenerationRequest([1, 2, 3], 2, f"{group}/00000001")


async def drop(router: Router, server: Server, group: str) -> None:
    """Send a group to `server` while it is down, so that the router drops it."""
    server.up = False
    router._group_engine[group] = router.engines.index(next(e for e in router.engines if e.client is server))
    with pytest.raises(EngineLost):
        await router.generate(turn(group))
    router.release(turn(group).episode_id)


@pytest.fixture
def quick_backoff(monkeypatch):
    monkeypatch.setattr(router_module, "READMIT_FIRST_WAIT_S", 0.05)
    monkeypatch.setattr(router_module, "ALL_LOST_POLL_S", 0.02)


def test_a_dropped_engine_is_taken_back_only_once_it_answers_and_holds_the_current_weights(
    quick_backoff, capsys
):
    a, b = Server("http://a:1"), Server("http://b:1")
    router = Router([a, b])
    router.stamp_version(3, holders=["http://a:1", "http://b:1"])
    a.held = b.held = 3

    async def scenario() -> None:
        await drop(router, b, "g1")
        assert router.alive == ["http://a:1"]
        await asyncio.sleep(0.06)
        b.restart()  # back up, holding its checkpoint (version 0)
        assert await router.readmit() == []
        assert router.alive == ["http://a:1"]  # stale weights: it stays out
        b.held = 3  # the driver's sync pushed version 3 to it
        await asyncio.sleep(0.2)
        assert await router.readmit() == ["http://b:1"]
        await router.close()

    asyncio.run(scenario())
    assert router.alive == ["http://a:1", "http://b:1"] and router.readmitted == 1
    console = capsys.readouterr().err
    assert "engine http://b:1 lost" in console
    assert (
        "engine http://b:1 taken back (it answers and holds weights version 3); 2 of 2 engines live"
        in console
    )


def test_a_server_the_driver_did_not_deliver_the_version_to_stays_out_even_if_it_says_it_holds_it(
    quick_backoff,
):
    """vLLM with LoRA cannot say which version its adapter is: the driver's list of servers
    that took the version decides."""
    a, b = Server("http://a:1"), Server("vllm-b")
    b.url = "http://b:1"
    router = Router([a, b])
    a.held = b.held = 4
    router.stamp_version(4, holders=["http://a:1"])

    assert router.alive == ["http://a:1"]  # dropped as the version was stamped

    async def scenario() -> list[str]:
        await asyncio.sleep(0.06)
        return await router.readmit()

    assert asyncio.run(scenario()) == []
    assert "weights version 4 not delivered to it yet" in router.engines[1].lost_reason
    router.stamp_version(4, holders=["vllm+http://b:1/", "http://a:1"])  # rollout.servers spelling
    router.engines[1].next_check = 0.0
    assert asyncio.run(router.readmit()) == ["http://b:1"]


def test_a_dead_engine_is_asked_again_at_doubling_waits_not_at_every_rollout(quick_backoff):
    a, b = Server("http://a:1"), Server("http://b:1")
    router = Router([a, b])

    async def scenario() -> None:
        await drop(router, b, "g1")
        started = time.monotonic()
        while time.monotonic() - started < 0.5:  # a rollout every 10 ms
            await router.readmit()
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    # Waits of 0.05, 0.1, 0.2, 0.4 s: at most 4 probes in 0.5 s, not 50.
    assert 2 <= b.probes <= 4
    assert router.alive == ["http://a:1"]


def test_with_every_engine_lost_the_rollout_waits_a_bounded_time_then_stops_naming_them(
    quick_backoff, capsys
):
    a, b = Server("http://a:1"), Server("http://b:1")
    router = Router([a, b], lost_wait_s=0.3)

    async def scenario() -> None:
        await drop(router, a, "g1")
        await drop(router, b, "g2")
        started = time.monotonic()
        with pytest.raises(EngineLost) as lost:
            await router.readmit()
        assert 0.3 <= time.monotonic() - started < 2.0
        message = str(lost.value)
        assert "all 2 engines are lost and none came back with weights version 0 within 0.3s" in message
        assert "http://a:1: ConnectError" in message and "http://b:1" in message

    asyncio.run(scenario())
    assert "every engine is lost; waiting up to 0.3s" in capsys.readouterr().err


def test_with_every_engine_lost_one_that_comes_back_within_the_wait_serves_the_rollout(quick_backoff):
    a, b = Server("http://a:1"), Server("http://b:1")
    router = Router([a, b], lost_wait_s=5.0)

    async def scenario() -> GenerationResult:
        await drop(router, a, "g1")
        await drop(router, b, "g2")

        async def restart_later() -> None:
            await asyncio.sleep(0.2)
            a.restart()

        started = time.monotonic()
        _, back = await asyncio.gather(restart_later(), router.readmit())
        assert back == ["http://a:1"] and time.monotonic() - started < 1.0
        result = await router.generate(turn("g3"))
        await router.close()
        return result

    assert asyncio.run(scenario()).token_ids == [7]


# -- vLLM and SGLang: what their servers say about the weights they hold ------------------------
def answering(*exchanges: dict) -> httpx.MockTransport:
    """A server that answers GET /health, and each recorded exchange's path with its response."""
    routes = {e["path"]: e for e in exchanges}

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, text="")
        exchange = routes[request.url.path]
        return httpx.Response(exchange.get("status", 200), json=exchange["response"])

    return httpx.MockTransport(handle)


def readmitted(client, version: int, adapter: bool = False) -> bool:
    """Whether a router that dropped `client` takes it back at `version`."""
    router = Router([client])
    router.stamp_version(version, adapter, holders=[client.url])
    router._drop(0, "ConnectError: connection refused")
    router.engines[0].next_check = 0.0
    return asyncio.run(router._check_dropped(None)) == [client.url]


def vllm(*exchanges: dict) -> VLLMClient:
    client = VLLMClient("http://v:8000", "/models/qwen", None)
    client.http = HttpTransport("http://v:8000", 10, answering(*exchanges))
    return client


def test_a_vllm_server_is_taken_back_when_its_weight_info_says_the_current_version():
    assert readmitted(vllm(VLLM["weight_info"]), 3)  # /finish_weight_update set "3"
    assert not readmitted(vllm(VLLM["weight_info_after_a_restart"]), 3)  # its checkpoint again
    assert not readmitted(vllm(VLLM["weight_info"]), 4)  # a sync it missed


def test_a_vllm_server_that_lost_forges_lora_adapter_in_a_restart_stays_out():
    assert readmitted(vllm(VLLM["models"]), 5, adapter=True)  # it lists /models/qwen-forge-lora
    restarted = {
        **VLLM["models"],
        "response": {"object": "list", "data": VLLM["models"]["response"]["data"][:1]},
    }
    assert not readmitted(vllm(restarted), 5, adapter=True)


def test_an_sglang_server_is_taken_back_when_its_model_info_says_the_current_weight_version():
    def sglang(exchange: dict) -> SGLangClient:
        client = SGLangClient("http://s:30000", None)
        client.http = HttpTransport("http://s:30000", 10, answering(exchange))
        return client

    assert readmitted(sglang(SGLANG["model_info"]), 4)
    assert not readmitted(sglang(SGLANG["model_info_after_a_restart"]), 4)


# -- a live server that restarted unnoticed: asked at each rollout's start -----------------------
def kept_live(client, version: int, adapter: bool = False) -> bool:
    """Whether a router that delivered `version` to `client` keeps it live at a rollout's start."""
    router = Router([client])
    router.stamp_version(version, adapter, holders=[client.url])
    asyncio.run(router.confirm_live())  # what `readmit` does first
    return router.alive == [client.url]


def test_a_live_vllm_server_that_restarted_unnoticed_is_dropped_at_the_next_rollout_start():
    """No request failed, but its /weight_info says None (its checkpoint): its samples would be
    stamped with the current version. One that says the version, or a newer one (the driver
    is mid-sync), or cannot say (no /weight_info), stays."""
    assert not kept_live(vllm(VLLM["weight_info_after_a_restart"]), 3)
    assert kept_live(vllm(VLLM["weight_info"]), 3)
    assert not kept_live(vllm(VLLM["weight_info"]), 4)  # the update it missed
    assert kept_live(vllm(VLLM["weight_info"]), 2)  # version 3 pushed, not yet stamped here
    assert kept_live(vllm({"path": "/weight_info", "status": 404, "response": {"detail": "Not Found"}}), 3)
    restarted = {
        **VLLM["models"],
        "response": {"object": "list", "data": VLLM["models"]["response"]["data"][:1]},
    }
    assert kept_live(vllm(VLLM["models"]), 5, adapter=True)
    assert not kept_live(vllm(restarted), 5, adapter=True)  # runtime adapters do not survive a restart


def test_a_live_sglang_server_back_at_its_default_weight_version_is_dropped_at_the_next_rollout_start(capsys):
    def sglang(exchange: dict) -> SGLangClient:
        client = SGLangClient("http://s:30000", None)
        client.http = HttpTransport("http://s:30000", 10, answering(exchange))
        return client

    assert kept_live(sglang(SGLANG["model_info"]), 4)
    assert not kept_live(sglang(SGLANG["model_info_after_a_restart"]), 4)
    assert (
        "engine http://s:30000 lost (it holds weights version 0, not 4 (restarted?))"
        in capsys.readouterr().err
    )


def test_the_version_probe_of_live_servers_is_bounded_and_concurrent(monkeypatch):
    """Servers that do not answer it in time cost one VERSION_PROBE_TIMEOUT_S together, and
    stay live (their requests' own timeout judges them)."""
    monkeypatch.setattr(router_module, "VERSION_PROBE_TIMEOUT_S", 0.2)

    async def hang(request: httpx.Request) -> httpx.Response:
        await asyncio.sleep(5.0)
        return httpx.Response(200, json={"weight_version": None})

    clients = []
    for host in "abc":
        client = VLLMClient(f"http://{host}:8000", "/models/qwen", None)
        client.http = HttpTransport(client.url, 10, httpx.MockTransport(hang))
        clients.append(client)
    router = Router(clients)
    router.stamp_version(3)
    started = time.monotonic()
    assert asyncio.run(router.readmit()) == []
    assert 0.2 <= time.monotonic() - started < 0.6
    assert router.live == 3


def test_a_live_server_the_drivers_sync_did_not_reach_is_dropped_when_the_version_is_stamped(quick_backoff):
    a, b = Server("http://a:1"), Server("http://b:1")
    router = Router([a, b])
    router.stamp_version(2, holders=["http://a:1"])  # b failed the update (its pool entry is dead)
    assert router.alive == ["http://a:1"]
    assert "did not deliver weights version 2" in router.engines[1].lost_reason
    b.held = 2
    router.stamp_version(2, holders=["http://a:1", "http://b:1"])  # the next sync reached it
    assert asyncio.run(router.readmit()) == ["http://b:1"]


# -- Forge's own server, over real HTTP ---------------------------------------------------------
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_a_restarted_forge_serve_is_taken_back_after_the_weight_push_and_samples_the_pushed_policy(tmp_path):
    """Two `forge serve`s; one is stopped and started again on its port from the checkpoint on
    disk. It stays out while it holds version 0, and once the driver's push (the same
    /forge/weights/tensors call a sync makes) gave it version 1 it is taken back: its
    samples carry version 1 and their logprobs are the pushed weights' own. Restarted again
    with no request failing, it is dropped at the next rollout's start."""
    import torch
    from transformers import AutoModelForCausalLM

    from forge.config import load_config
    from forge.models.loading import resolve_model_path
    from forge.rollout.engines.remote import ForgeClient
    from forge.rollout.engines.server import EngineServer, make_service
    from forge.rollout.engines.updates import tensors_to_bytes

    cfg = load_config("configs/smoke.yaml", [])
    model_path = resolve_model_path(cfg.model, tmp_path / "model", seed=cfg.seed)
    trained = AutoModelForCausalLM.from_pretrained(model_path).eval()
    with torch.no_grad():  # "the trainer's step": every weight moved
        generator = torch.Generator().manual_seed(0)
        for tensor in trained.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    blob = tensors_to_bytes({name: tensor.clone() for name, tensor in trained.state_dict().items()})

    def start(port: int) -> EngineServer:
        return EngineServer(
            make_service(model_path, max_new_tokens=8, max_context_tokens=256), port=port
        ).start()

    port_a, port_b = free_port(), free_port()
    server_a, server_b = start(port_a), start(port_b)
    clients = [ForgeClient(s.url, 10.0, Sampling(1.0, 1.0)) for s in (server_a, server_b)]
    router = Router(clients, name="rollout worker 0")

    async def push(client: ForgeClient) -> None:
        await client.push_tensors(blob, 1)

    try:

        async def before_restart() -> None:
            await asyncio.gather(*(push(c) for c in clients))
            router.stamp_version(1, holders=[server_a.url, server_b.url])
            server_b.stop()
            router._group_engine["g1"] = 1
            with pytest.raises(EngineLost):
                await router.generate(turn("g1"))
            router.release(turn("g1").episode_id)

        asyncio.run(before_restart())
        assert router.alive == [server_a.url]
        server_b = start(port_b)  # restarted from the checkpoint on disk: version 0
        router.engines[1].next_check = 0.0
        assert asyncio.run(router.readmit()) == []
        assert "does not hold weights version 1" in router.engines[1].lost_reason
        asyncio.run(push(clients[1]))  # the driver's next sync
        router.engines[1].next_check = 0.0

        async def after_push() -> GenerationResult:
            assert await router.readmit() == [server_b.url]
            router._group_engine["g2"] = 1
            result = await router.generate(GenerationRequest([5, 6, 7, 8], 8, "g2/00000001", seed=11))
            await router.close()
            return result

        result = asyncio.run(after_push())
        # Then b restarts between two rollouts, with no request of a rollout failing: at the
        # next rollout's start it says version 0 and is dropped; a serves on.
        answered = server_b.service.served.metrics()["requests"]
        server_b.stop()
        server_b = start(port_b)
        assert asyncio.run(router.readmit()) == [] and router.alive == [server_a.url]
        assert "it holds weights version 0, not 1 (restarted?)" in router.engines[1].lost_reason
    finally:
        for server in (server_a, server_b):
            server.stop()
    assert answered == 1  # the restarted server answered it
    assert result.policy_version == 1
    ids = torch.tensor([[5, 6, 7, 8, *result.token_ids]])
    with torch.no_grad():
        logits = trained(ids).logits[0, 3:-1].log_softmax(-1)
    expected = logits.gather(-1, torch.tensor(result.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(result.logprobs), expected, atol=1e-4)


def test_a_sync_with_every_server_lost_waits_engine_timeout_s_for_one_then_stops_the_run(capsys):
    from forge.config import load_config
    from forge.failures import RunStopped
    from forge.rollout.engines.pool import EnginePool

    urls = [f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{free_port()}"]  # nothing listens
    cfg = load_config(
        "configs/smoke.yaml",
        ["rollout.engine=remote", f"rollout.servers=[{urls[0]},{urls[1]}]", "rollout.engine_timeout_s=1"],
    )
    pool = EnginePool(list(urls), [], cfg)
    for url in urls:
        pool.lost(url, "weight update failed: ConnectError")  # a remote pool waits; it does not raise here
    started = time.monotonic()
    with pytest.raises(RunStopped) as stopped:
        pool.sync([None], 5, trainer=None)
    assert 1.0 <= time.monotonic() - started < 5.0
    assert (
        "all 2 inference servers are lost and none answered again within rollout.engine_timeout_s=1s"
        in str(stopped.value)
    )
    assert urls[0] in str(stopped.value) and urls[1] in str(stopped.value)
    assert "every inference server is lost; waiting up to 1s" in capsys.readouterr().err
    assert pool.engine_metrics() == {}  # no server ever took a version


def test_a_worker_that_waited_in_vain_for_its_engines_stops_the_run_with_its_reason(monkeypatch):
    import ray
    from ray.exceptions import RayTaskError

    from forge.failures import RunStopped
    from forge.run.faults import collect_groups

    cause = EngineLost("every engine", "all 2 engines are lost and none came back (http://a:1: refused)")
    error = RayTaskError("RolloutWorker.rollout", "Traceback ...", cause).as_instanceof_cause()
    monkeypatch.setattr(ray, "get", lambda ref: (_ for _ in ()).throw(error))
    with pytest.raises(
        RunStopped, match="a rollout worker stopped: engine every engine: all 2 engines are lost"
    ):
        collect_groups(object(), [{"task_id": "t"}], 2)


def test_a_workers_engine_lost_error_crosses_ray_as_itself():
    """Ray pickles a worker's exception to the driver: EngineLost must come back with its url
    and reason (rebuilt from its message alone it raised TypeError, and Ray handed the driver
    an UnserializableException, so an async run whose engines were all lost ended in a traceback)."""
    import pickle

    from forge.rollout.engines.remote import RequestAborted

    for error in (
        EngineLost("every engine", "all 2 engines are lost"),
        RequestAborted("http://a:1", "aborted"),
    ):
        back = pickle.loads(pickle.dumps(error))
        assert type(back) is type(error) and (back.url, back.reason, str(back)) == (
            error.url,
            error.reason,
            str(error),
        )


# -- the driver: a lost vLLM / SGLang server that answers again gets the weights at the next sync ---
class Restartable:
    """Recorded vLLM / SGLang exchanges behind an httpx transport, and a switch: while down,
    every request is refused as a stopped server's would be."""

    def __init__(self, *exchanges: dict) -> None:
        self.routes = {(e["method"], e["path"]): e for e in exchanges}
        self.up = True
        self.seen: list[str] = []

    def transport(self) -> httpx.MockTransport:
        def handle(request: httpx.Request) -> httpx.Response:
            if not self.up:
                raise httpx.ConnectError("All connection attempts failed", request=request)
            self.seen.append(request.url.path)
            if request.url.path == "/health":
                return httpx.Response(200, text="")
            exchange = self.routes.get((request.method, request.url.path))
            if exchange is None:  # a route these recordings lack: as a server without it answers
                return httpx.Response(404, json={"detail": "Not Found"})
            if "response_text" in exchange:
                return httpx.Response(200, text=exchange["response_text"])
            return httpx.Response(exchange.get("status", 200), json=exchange["response"])

        return httpx.MockTransport(handle)


class Trainer:
    """The trainer actor's calls a remote sync makes, answered at once (with `ray.get` as identity)."""

    class _Call:
        def __init__(self, answer) -> None:
            self.remote = answer

    def __init__(self) -> None:
        self.save = self._Call(lambda path: path)
        self.__ray_call__ = self._Call(lambda fn, path: path)


def pool_over(servers: dict[str, Restartable], overrides: list[str], monkeypatch):
    import ray

    from forge.config import load_config
    from forge.rollout.engines import clients, health
    from forge.rollout.engines.pool import EnginePool

    real = clients.make_client

    def make_client(spec: str, model: str, sampling, timeout_s: float = 120.0, keys=NO_KEYS):
        client = real(spec, model, sampling, timeout_s, keys)
        client.http = HttpTransport(client.url, timeout_s, servers[spec].transport(), keys)
        client.http.busy_retry_delays_s = ()
        return client

    monkeypatch.setattr(clients, "make_client", make_client)
    monkeypatch.setattr(ray, "get", lambda ref, **_: ref)
    monkeypatch.setattr(health, "READMIT_FIRST_WAIT_S", 0.0)
    cfg = load_config(
        "configs/smoke.yaml",
        ["rollout.engine=remote", f"rollout.servers=[{','.join(servers)}]", *overrides],
    )
    return EnginePool(list(servers), [], cfg)


def test_a_lost_sglang_server_that_answers_again_loads_the_current_folder_and_counts_live(
    tmp_path, monkeypatch, capsys
):
    a, b = "sglang+http://a:30000", "sglang+http://b:30000"
    servers = {url: Restartable(SGLANG["update_weights_from_disk"]) for url in (a, b)}
    pool = pool_over(servers, [f"rollout.weight_dir={tmp_path}", "train.mode=sync"], monkeypatch)
    trainer = Trainer()
    pool.sync([None], 1, trainer)
    servers[b].up = False
    pool.sync([None], 2, trainer)
    assert pool.holders(2) == [a] and b in pool.dead
    assert pool.engine_metrics() == {"engine_servers_live": 1.0, "engine_servers_readmitted": 0.0}
    servers[b].up = True  # restarted, holding its checkpoint
    servers[b].seen.clear()
    pool.sync([None], 3, trainer)
    assert servers[b].seen == ["/health", "/update_weights_from_disk"]  # asked, then given version 3
    assert pool.holders(3) == [a, b]
    assert pool.engine_metrics() == {"engine_servers_live": 2.0, "engine_servers_readmitted": 1.0}
    console = capsys.readouterr().err
    assert f"engine {b} answers again" in console
    assert f"engine {b} took weights version 3 and serves again (2 of 2 engines live)" in console


class KeyedSGLang(Restartable):
    """An SGLang started with --api-key and --admin-api-key, recording each request's key: its
    admin routes take the admin key alone, the others the API key, /health any (SGLang's
    decide_request_auth, python/sglang/srt/utils/auth.py)."""

    ADMIN = ("/update_weights_from_disk", "/pause_generation", "/continue_generation", "/load_lora_adapter")

    def __init__(self, *exchanges: dict) -> None:
        super().__init__(*exchanges)
        self.keys: list[tuple[str, str | None]] = []

    def transport(self) -> httpx.MockTransport:
        recorded = super().transport()

        def handle(request: httpx.Request) -> httpx.Response:
            path, given = request.url.path, request.headers.get("authorization")
            self.keys.append((path, given))
            wanted = None if path == "/health" else "admin-key" if path in self.ADMIN else "api-key"
            if self.up and wanted is not None and given != f"Bearer {wanted}":
                return httpx.Response(401, json={"error": "Unauthorized"})
            return recorded.handler(request)

        return httpx.MockTransport(handle)


def test_the_drivers_weight_syncs_and_readmission_probes_carry_the_servers_keys(tmp_path, monkeypatch):
    monkeypatch.setenv("FORGE_TEST_API_KEY", "api-key")
    monkeypatch.setenv("FORGE_TEST_ADMIN_KEY", "admin-key")
    a, b = "sglang+http://a:30000", "sglang+http://b:30000"
    servers = {url: KeyedSGLang(SGLANG["update_weights_from_disk"]) for url in (a, b)}
    keys = [
        "rollout.server_api_key_env=FORGE_TEST_API_KEY",
        "rollout.server_admin_api_key_env=FORGE_TEST_ADMIN_KEY",
    ]
    pool = pool_over(servers, [f"rollout.weight_dir={tmp_path}", "train.mode=sync", *keys], monkeypatch)
    trainer = Trainer()
    pool.sync([None], 1, trainer)
    servers[b].up = False
    pool.sync([None], 2, trainer)
    servers[b].up = True
    pool.sync([None], 3, trainer)  # b answers /health again and takes version 3
    assert pool.holders(3) == [a, b]
    assert ("/health", "Bearer api-key") in servers[b].keys
    assert {
        given for path, given in servers[a].keys + servers[b].keys if path == "/update_weights_from_disk"
    } == {"Bearer admin-key"}


class StuckSGLang(Restartable):
    """An SGLang server whose engine is stuck: /update_weights_from_disk never answers (each
    call runs into the client's timeout) while GET /health still does."""

    def transport(self) -> httpx.MockTransport:
        recorded = super().transport()

        async def handle(request: httpx.Request) -> httpx.Response:
            if request.url.path == "/update_weights_from_disk":
                await asyncio.sleep(request.extensions["timeout"]["read"])
                raise httpx.ReadTimeout("timed out", request=request)
            return recorded.handle_request(request)

        return httpx.MockTransport(handle)


def test_stuck_sglang_servers_cost_a_sync_one_timeout_and_the_live_one_takes_the_version(
    tmp_path, monkeypatch, capsys
):
    """Three of four SGLang servers never answer the update: each is dropped naming it, and
    the sync waits for them all at once (one after another on main: 3 x the timeout)."""
    timeout_s = 2.0
    urls = [f"sglang+http://{host}:30000" for host in "abcd"]
    servers = {urls[0]: Restartable(SGLANG["update_weights_from_disk"])}
    servers.update({url: StuckSGLang() for url in urls[1:]})
    pool = pool_over(
        servers,
        [f"rollout.weight_dir={tmp_path}", "train.mode=sync", f"rollout.engine_timeout_s={timeout_s}"],
        monkeypatch,
    )
    started = time.monotonic()
    pool.sync([None], 1, Trainer())
    took = time.monotonic() - started
    assert took < 2 * timeout_s, took
    assert pool.holders(1) == [urls[0]] and list(pool.dead) == urls[1:]
    console = capsys.readouterr().err
    for url in urls[1:]:
        assert f"engine {url} lost (weight update failed: engine http" in console


class SGLangWeights(Restartable):
    """An SGLang server that says the weight_version it was last given (its own default
    after a restart)."""

    def __init__(self) -> None:
        super().__init__(SGLANG["update_weights_from_disk"])
        self.held = "default"

    def transport(self) -> httpx.MockTransport:
        recorded = super().transport()

        def handle(request: httpx.Request) -> httpx.Response:
            if self.up and request.url.path == "/model_info":
                self.seen.append(request.url.path)
                return httpx.Response(
                    200, json={**SGLANG["model_info"]["response"], "weight_version": self.held}
                )
            if self.up and request.url.path == "/update_weights_from_disk":
                self.held = json.loads(request.content)["weight_version"]
            return recorded.handle_request(request)

        return httpx.MockTransport(handle)


def test_a_server_restarted_between_two_pushes_with_none_failing_counts_as_taken_back(
    tmp_path, monkeypatch, capsys
):
    """b restarts between the pushes of versions 1 and 2 and answers again before the push of
    2, which it takes: no push failed, so the driver never saw it lost, while a worker's
    rollout-start check dropped it and takes it back after that push. The driver asks which
    version each server holds before it pushes, and counts b as taken back."""
    a, b = "sglang+http://a:30000", "sglang+http://b:30000"
    servers = {a: SGLangWeights(), b: SGLangWeights()}
    pool = pool_over(servers, [f"rollout.weight_dir={tmp_path}", "train.mode=sync"], monkeypatch)
    trainer = Trainer()
    pool.sync([None], 1, trainer)
    servers[b].held = "default"  # restarted from its checkpoint; up again before the next push
    pool.sync([None], 2, trainer)
    assert servers[b].held == "2" and pool.holders(2) == [a, b]
    assert pool.engine_metrics() == {"engine_servers_live": 2.0, "engine_servers_readmitted": 1.0}
    pool.sync([None], 3, trainer)  # nothing restarted since: nothing more counted
    assert pool.engine_metrics() == {"engine_servers_live": 2.0, "engine_servers_readmitted": 1.0}
    console = capsys.readouterr().err
    assert f"engine {b} says it holds weights version 0, not 1: it restarted since the last push" in console
    assert f"engine {b} took weights version 2 and serves again (2 of 2 engines live)" in console
    assert f"engine {a} says" not in console


def test_a_lost_vllm_server_in_a_lora_run_gets_the_adapter_again_before_it_counts_live(tmp_path, monkeypatch):
    a, b = "vllm+http://a:8000", "vllm+http://b:8000"
    exchanges = (VLLM["pause"], VLLM["load_lora_adapter"], VLLM["resume"])
    servers = {url: Restartable(*exchanges) for url in (a, b)}
    pool = pool_over(
        servers, [f"rollout.weight_dir={tmp_path}", "model.lora.enabled=true", "train.mode=sync"], monkeypatch
    )
    trainer = Trainer()
    servers[b].up = False
    pool.sync([None], 1, trainer)
    assert pool.holders(1) == [a]
    servers[b].up = True
    servers[b].seen.clear()
    pool.sync([None], 2, trainer)
    assert servers[b].seen == ["/health", "/pause", "/v1/load_lora_adapter", "/resume"]
    assert pool.holders(2) == [a, b] and pool.readmitted == 1


def test_a_lost_vllm_server_with_full_weights_rejoins_a_weight_transfer_group_formed_afresh(
    tmp_path, monkeypatch, capsys
):
    """NCCL groups cannot grow: the server that answers again and the ones still in the
    group all join a new one (world 1 + 2), then take the version."""
    a, b = "vllm+http://a:8000", "vllm+http://b:8000"
    exchanges = [
        VLLM[name]
        for name in (
            "get_world_size",
            "init_weight_transfer_engine",
            "pause",
            "start_weight_update",
            "update_weights",
            "finish_weight_update",
            "resume",
        )
    ]
    servers = {url: Restartable(*exchanges, VLLM["weight_info"]) for url in (a, b)}
    pool = pool_over(servers, ["train.mode=sync", "train.num_gpus=1"], monkeypatch)
    joined: list[int] = []

    class NcclTrainer:
        """The trainer's side of vLLM's weight transfer (forge.rollout.engines.vllm_transfer)."""

        class _Call:
            @staticmethod
            def remote(fn, *args):
                async def answer():
                    if fn.__name__ == "trainer_address":
                        return "10.0.0.5", 29555
                    if fn.__name__ == "trainer_join":
                        joined.append(args[2])  # host, port, world, timeout_s
                        info = VLLM["update_weights"]["request"]["update_info"]
                        return info["names"], info["dtype_names"], info["shapes"]
                    return None

                return answer()

        __ray_call__ = _Call()

    trainer = NcclTrainer()
    pool.sync([None], 1, trainer)
    assert joined == [3] and pool.holders(1) == [a, b]
    servers[b].up = False
    pool.sync([None], 2, trainer)  # b is dropped before the update, which a takes in a group of its own
    assert pool.holders(2) == [a] and joined == [3, 2]
    assert "every inference server is lost" not in capsys.readouterr().err  # a was never dropped for b
    servers[b].up = True
    servers[b].seen.clear()
    pool.sync([None], 3, trainer)
    assert joined == [3, 2, 3]  # a new group: the trainer and both servers
    assert servers[b].seen[1:4] == ["/health", "/get_world_size", "/init_weight_transfer_engine"]
    assert "/finish_weight_update" in servers[b].seen and pool.holders(3) == [a, b]


# -- a rollout worker Ray restarted: its router starts from the driver's view, not its creation ---
def test_a_restarted_workers_router_routes_by_the_drivers_view_not_the_engines_it_was_created_with():
    """Ray rebuilds a dead worker from its creation arguments: a router over the run's first
    engines, at version 0, all live. The driver meanwhile lost b (c was started in place of
    it) and delivered version 5 to a and c; a then restarted from its checkpoint. With the
    driver's view the new router drops b, adds c, and drops a at the rollout's start, so
    every group goes to c and is stamped with the version c holds."""
    from forge.rollout.engines.router import EngineView

    a, b, c = Server("http://a:1"), Server("http://b:1"), Server("http://c:1")
    a.held = c.held = 5
    b.up = False
    a.restart()
    router = Router([a, b], name="rollout worker 0")  # as Ray rebuilt it
    servers = {s.url: s for s in (a, b, c)}
    router.take_view(EngineView(5, False, [a.url, c.url], [a.url, b.url, c.url]), servers.__getitem__)

    async def rollout() -> list[GenerationResult]:
        await router.readmit()
        results = [await router.generate(turn(f"g{i}")) for i in range(3)]
        await router.close()
        return results

    results = asyncio.run(rollout())
    assert router.alive == [c.url]
    assert [r.policy_version for r in results] == [5, 5, 5]
    assert "it holds weights version 0, not 5" in router.engines[0].lost_reason
    assert "did not deliver weights version 5" in router.engines[1].lost_reason


def test_the_view_adds_each_engine_once_and_a_vllm_spec_names_its_server():
    from forge.rollout.engines.router import EngineView

    a, c = Server("http://a:1"), Server("http://c:1")
    made = []

    def client_for(spec: str) -> Server:
        made.append(spec)
        return c

    router = Router([a])
    view = EngineView(2, False, None, ["http://a:1/", "vllm+http://c:1"])
    router.take_view(view, client_for)
    router.take_view(view, client_for)
    assert made == ["vllm+http://c:1"] and router.alive == [a.url, c.url] and router.version == 2


def test_an_async_run_tells_a_restarted_worker_the_engine_view_before_its_first_rollout():
    """A worker Ray restarted gets the driver's engine view in the call before its next
    rollout (calls from one caller to an actor run in order)."""
    from types import SimpleNamespace

    from forge.rollout.engines.router import EngineView
    from forge.run.async_ import AsyncLoop, BusyClock

    calls: list[tuple[str, tuple]] = []

    class Worker:
        def __getattr__(self, method: str):
            return SimpleNamespace(remote=lambda *args: calls.append((method, args)) or object())

    view = EngineView(4, False, ["http://c:1"], ["http://a:1", "http://c:1"])
    loop = AsyncLoop.__new__(AsyncLoop)
    loop.run = SimpleNamespace(
        workers=[Worker(), Worker()], engine_view=view, tasks=SimpleNamespace(take=lambda n: [{}] * n)
    )
    loop.cfg = SimpleNamespace(
        train=SimpleNamespace(checkpoint_every=0), rollout=SimpleNamespace(group_size=2)
    )
    loop.weights, loop.needs_sync, loop.in_flight = None, {1}, {}
    loop.groups_in_flight, loop.clocks = [0, 0], [BusyClock(), BusyClock()]
    loop.start_groups(0, [0])
    loop.start_groups(1, [1])
    loop.start_groups(1, [2])
    assert [name for name, _ in calls] == [
        "rollout_groups",
        "set_engine_view",
        "rollout_groups",
        "rollout_groups",
    ]
    assert calls[1][1] == (view,)


# -- SGLang with Forge's LoRA adapter: what the driver loaded is what workers sample ------------
def sglang_lora_server(seen: list[dict]) -> httpx.MockTransport:
    """An SGLang server in a LoRA run that loaded forge-v5: GET /model_info keeps the base
    weights' version ("default": loading an adapter does not change it), GET /v1/models lists
    the adapter; POST /generate answers as recorded."""
    answer = json.loads(json.dumps(SGLANG["generate"]["response"]))
    answer["meta_info"]["weight_version"] = "default"

    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/health":
            return httpx.Response(200, text="")
        if request.url.path == "/model_info":
            return httpx.Response(200, json=SGLANG["model_info_after_a_restart"]["response"])
        if request.url.path == "/v1/models":
            listed = json.loads(json.dumps(SGLANG["models_with_an_adapter"]["response"]))
            listed["data"][1]["id"] = "forge-v5"
            return httpx.Response(200, json=listed)
        seen.append(json.loads(request.content))
        return httpx.Response(200, json=answer)

    return httpx.MockTransport(handle)


def test_a_worker_samples_the_lora_adapter_the_driver_loaded_on_an_sglang_server():
    """The driver loads adapter version 5 as forge-v5 through its own client; a worker's router,
    stamped with version 5 and adapter=True, must name it (without lora_path SGLang samples the
    base model) and stamp the samples 5. On main its SGLang clients were never told: requests
    went to the base model, stamped 0."""
    seen: list[dict] = []
    client = SGLangClient("http://s:30000", Sampling(1.0, 1.0, (3,)))
    client.http = HttpTransport("http://s:30000", 10, sglang_lora_server(seen))
    router = Router([client])
    router.stamp_version(5, adapter=True, holders=[client.url])

    async def play() -> GenerationResult:
        await router.readmit()  # a rollout's start: the server stays live
        return await router.generate(
            GenerationRequest(SGLANG["generate"]["given"]["token_ids"], 4, "g/00000001")
        )

    result = asyncio.run(play())
    assert router.alive == [client.url]  # it lists forge-v5: not a restart
    assert seen[0]["lora_path"] == "forge-v5"
    assert result.policy_version == 5


class SGLangAdapters(Restartable):
    """An SGLang server started with --enable-lora, as its LoRA registry behaves
    (python/sglang/srt/lora/lora_registry.py): adapters by name, a request that names one not
    loaded refused (400), an unload of one not loaded refused; the base weights' version
    stays "default"."""

    def __init__(self) -> None:
        super().__init__(SGLANG["pause_generation"], SGLANG["continue_generation"])
        self.loaded: dict[str, str] = {}
        self.sampled: list[str] = []  # the adapter each answered request named

    def transport(self) -> httpx.MockTransport:
        recorded = super().transport()

        def handle(request: httpx.Request) -> httpx.Response:
            path = request.url.path
            body = json.loads(request.content) if request.content else {}
            if not self.up:
                return recorded.handle_request(request)
            if path == "/load_lora_adapter":
                self.seen.append(path)
                if body["lora_name"] in self.loaded:
                    return httpx.Response(
                        200, json={"success": False, "error_message": f"{body['lora_name']} already exists"}
                    )
                self.loaded[body["lora_name"]] = body["lora_path"]
                return httpx.Response(
                    200, json={**SGLANG["load_lora_adapter"]["response"], "loaded_adapters": self.loaded}
                )
            if path == "/unload_lora_adapter":
                self.seen.append(path)
                if self.loaded.pop(body["lora_name"], None) is None:
                    return httpx.Response(
                        200, json={"success": False, "error_message": f"{body['lora_name']} does not exist"}
                    )
                return httpx.Response(
                    200, json={**SGLANG["unload_lora_adapter"]["response"], "loaded_adapters": self.loaded}
                )
            if path == "/model_info":
                return httpx.Response(200, json=SGLANG["model_info_after_a_restart"]["response"])
            if path == "/v1/models":
                base = SGLANG["models_with_an_adapter"]["response"]["data"]
                cards = [
                    base[0],
                    *({**base[1], "id": name, "root": folder} for name, folder in self.loaded.items()),
                ]
                return httpx.Response(200, json={"object": "list", "data": cards})
            if path == "/generate":
                name = body.get("lora_path")
                if name not in self.loaded:
                    message = (
                        f"The following requested LoRA adapters are not loaded: {name}\n"
                        f"Loaded adapters: odict_keys({list(self.loaded)})."
                    )
                    return httpx.Response(400, json={"error": {"message": message}})
                self.sampled.append(name)
                answer = json.loads(json.dumps(SGLANG["generate"]["response"]))
                answer["meta_info"]["weight_version"] = "default"
                return httpx.Response(200, json=answer)
            return recorded.handle_request(request)

        return httpx.MockTransport(handle)


def test_an_sglang_lora_run_loads_each_version_as_an_adapter_and_keeps_the_last_one_loaded(
    tmp_path, monkeypatch
):
    """The driver loads version N's adapter as forge-vN and unloads only the version before
    the last: a worker still naming the last version (not yet told of N, or its request
    sent just before) is still answered. On main the driver sent SGLang merged full weights
    (/update_weights_from_disk) while workers named forge-vN, which no server had loaded."""
    url = "sglang+http://s:30000"
    server = SGLangAdapters()
    pool = pool_over(
        {url: server},
        [
            f"rollout.weight_dir={tmp_path}",
            "model.lora.enabled=true",
            "train.mode=sync",
            "rollout.engine_timeout_s=2",
        ],
        monkeypatch,
    )
    trainer = Trainer()
    worker = SGLangClient("http://s:30000", Sampling(1.0, 1.0, (3,)))
    worker.http = HttpTransport("http://s:30000", 10, server.transport())
    router = Router([worker])
    prompt = GenerationRequest(SGLANG["generate"]["given"]["token_ids"], 4, "g/00000001")

    pool.sync([None], 1, trainer)
    router.take_view(pool.view(1), lambda spec: None)
    pool.sync([None], 2, trainer)  # the worker is not told yet: its requests name forge-v1
    assert sorted(server.loaded) == ["forge-v1", "forge-v2"]
    assert server.loaded["forge-v2"] == str(tmp_path / "v000002-adapter")
    assert asyncio.run(router.generate(prompt)).policy_version == 1

    router.take_view(pool.view(2), lambda spec: None)
    pool.sync([None], 3, trainer)
    assert sorted(server.loaded) == ["forge-v2", "forge-v3"]  # forge-v1: no worker names it now
    assert asyncio.run(router.generate(prompt)).policy_version == 2
    router.take_view(pool.view(3), lambda spec: None)
    assert asyncio.run(router.generate(prompt)).policy_version == 3
    assert server.sampled == ["forge-v1", "forge-v2", "forge-v3"]
    assert "/update_weights_from_disk" not in server.seen
    assert pool.holders(3) == [url]


def test_an_sglang_lora_server_restarted_between_two_pushes_counts_as_taken_back(
    tmp_path, monkeypatch, capsys
):
    """A restarted SGLang has lost every adapter; no push failed, so the driver never saw it
    lost. Before each push the driver asks whether it still lists the adapter it was given
    (GET /v1/models): it did not ask SGLang servers in LoRA runs, so the restart went unsaid."""
    url = "sglang+http://s:30000"
    server = SGLangAdapters()
    overrides = [f"rollout.weight_dir={tmp_path}", "model.lora.enabled=true", "train.mode=sync"]
    pool = pool_over({url: server}, overrides, monkeypatch)
    trainer = Trainer()
    pool.sync([None], 1, trainer)
    pool.sync([None], 2, trainer)
    server.loaded.clear()  # restarted, up again before the next push
    pool.sync([None], 3, trainer)
    assert sorted(server.loaded) == ["forge-v3"] and pool.holders(3) == [url]
    assert pool.engine_metrics()["engine_servers_readmitted"] == 1.0
    console = capsys.readouterr().err
    assert f"engine {url} says it holds weights version 0, not 2: it restarted since the last push" in console
