"""Inference servers started with an API key (vllm serve --api-key, SGLang --api-key and
--admin-api-key): Forge sends the keys the config's rollout.server_api_key_env /
rollout.server_admin_api_key_env name on every request, a missing or wrong key is refused at
the start check naming the setting, and no key reaches the saved config or the console.

The fake servers guard as vLLM and SGLang do (vllm/entrypoints/serve/middleware/authenticate.py:
every route but /health, /ping, /load, /version, /metrics and the docs; SGLang's
decide_request_auth, python/sglang/srt/utils/auth.py: the admin key alone on its admin routes
once set, the API key on the others, /health* and /metrics* open)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest
import yaml

from forge.config import ConfigError, load_config
from forge.rollout.engines.clients import make_client
from forge.rollout.engines.protocol import GenerationRequest
from forge.rollout.engines.remote import ProtocolError, Sampling
from forge.rollout.engines.server_keys import ServerKeys

FIXTURES = Path(__file__).parent / "fixtures" / "engines"
VLLM = json.loads((FIXTURES / "vllm.json").read_text())
SGLANG = json.loads((FIXTURES / "sglang.json").read_text())
PROMPT = [2, 6, 9, 10, 11, 3, 2, 7]  # the recorded responses' 8 prompt tokens

KEY = "sk-test-0123456789abcdef"  # what the servers were started with
ADMIN_KEY = "sk-admin-fedcba9876543210"

VLLM_ANSWERS = {
    "/v1/models": "models",
    "/version": "version",
    "/server_info": "server_info",
    "/v1/completions": "completion",
    "/pause": "pause",
    "/resume": "resume",
    "/get_world_size": "get_world_size",
    "/init_weight_transfer_engine": "init_weight_transfer_engine",
    "/start_weight_update": "start_weight_update",
    "/update_weights": "update_weights",
    "/finish_weight_update": "finish_weight_update",
    "/weight_info": "weight_info",
}
VLLM_PUBLIC = ("/health", "/ping", "/load", "/version", "/metrics")
SGLANG_ANSWERS = {
    "/v1/models": "models",
    "/server_info": "server_info",
    "/model_info": "model_info",
    "/generate": "generate",
    "/update_weights_from_disk": "update_weights_from_disk",
    "/pause_generation": "pause_generation",
    "/continue_generation": "continue_generation",
    "/load_lora_adapter": "load_lora_adapter",
    "/unload_lora_adapter": "unload_lora_adapter",
}
SGLANG_ADMIN = (
    "/update_weights_from_disk",
    "/pause_generation",
    "/continue_generation",
    "/load_lora_adapter",
    "/unload_lora_adapter",
    "/abort_request",
)


def guarded(
    kind: str, seen: list[tuple[str, str | None]], api_key: str | None = KEY, admin_key: str | None = None
) -> httpx.MockTransport:
    """A server started with `api_key` (and, SGLang, `admin_key`) answering recorded bodies;
    `seen` gets each request's path and Authorization header."""
    recorded, answers = (VLLM, VLLM_ANSWERS) if kind == "vllm" else (SGLANG, SGLANG_ANSWERS)

    def handle(request: httpx.Request) -> httpx.Response:
        path, given = request.url.path, request.headers.get("authorization")
        seen.append((path, given))
        if kind == "vllm":
            wanted = None if path.startswith(VLLM_PUBLIC) else api_key
        elif path.startswith(("/health", "/metrics")):
            wanted = None
        elif path in SGLANG_ADMIN:
            wanted = admin_key or api_key
        else:
            wanted = api_key
        if wanted is not None and given != f"Bearer {wanted}":
            return httpx.Response(401, json={"error": "Unauthorized"})
        if path == "/health":
            return httpx.Response(200, text="")
        return httpx.Response(200, json=recorded[answers[path]]["response"])

    return httpx.MockTransport(handle)


def remote_config(servers: list[str], *overrides: str):
    return load_config(
        "configs/smoke.yaml",
        [
            "rollout.engine=remote",
            f"rollout.servers=[{','.join(servers)}]",
            "model.path=/models/qwen",
            "rollout.weight_dir=/shared/forge",
            "train.num_gpus=1",
            *overrides,
        ],
    )


def client_over(spec: str, transport: httpx.MockTransport, keys: ServerKeys):
    client = make_client(spec, "policy", Sampling(1.0, 1.0, (3,)), 10.0, keys)
    client.http.transport = transport  # before its first request, which opens the session
    return client


# -- the start check --------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_a_server_that_wants_a_key_and_gets_none_is_refused_at_the_start_naming_the_setting(
    kind, monkeypatch
):
    from forge.rollout.engines.server_check import check_servers

    monkeypatch.delenv("FORGE_TEST_SERVER_KEY", raising=False)
    cfg = remote_config([f"{kind}+http://h:1"])
    with pytest.raises(ConfigError, match=r"\(401\).*sent none.*rollout\.server_api_key_env"):
        check_servers(cfg, guarded(kind, []), wait=False)


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_with_the_key_named_the_start_check_passes_and_every_request_carries_it(kind, monkeypatch, capsys):
    from forge.rollout.engines.server_check import check_servers

    monkeypatch.setenv("FORGE_TEST_SERVER_KEY", KEY)
    cfg = remote_config([f"{kind}+http://h:1"], "rollout.server_api_key_env=FORGE_TEST_SERVER_KEY")
    seen: list[tuple[str, str | None]] = []
    lines = check_servers(cfg, guarded(kind, seen), wait=False)
    assert "serving /models/qwen" in lines[0]
    assert seen and {given for _, given in seen} == {f"Bearer {KEY}"}
    assert KEY not in "\n".join(lines) + capsys.readouterr().err


def test_a_wrong_key_is_refused_at_the_start_naming_the_variable_but_not_the_key(monkeypatch):
    from forge.rollout.engines.server_check import check_servers

    monkeypatch.setenv("FORGE_TEST_SERVER_KEY", "sk-stale")
    cfg = remote_config(["vllm+http://h:1"], "rollout.server_api_key_env=FORGE_TEST_SERVER_KEY")
    with pytest.raises(ConfigError) as refused:
        check_servers(cfg, guarded("vllm", []), wait=False)
    message = str(refused.value)
    assert "refused the key in $FORGE_TEST_SERVER_KEY, rollout.server_api_key_env" in message
    assert "sk-stale" not in message


def test_a_key_variable_named_but_unset_is_refused_before_any_request(monkeypatch):
    from forge.rollout.engines.server_check import check_servers

    monkeypatch.delenv("FORGE_TEST_SERVER_KEY", raising=False)
    cfg = remote_config(["vllm+http://h:1"], "rollout.server_api_key_env=FORGE_TEST_SERVER_KEY")
    seen: list = []
    with pytest.raises(
        ConfigError, match=r"rollout\.server_api_key_env=FORGE_TEST_SERVER_KEY, but this process"
    ):
        check_servers(cfg, guarded("vllm", seen), wait=False)
    assert seen == []
    # a rollout worker making its clients is refused the same way, before its first episode
    with pytest.raises(ConfigError, match=r"no FORGE_TEST_SERVER_KEY in its environment"):
        make_client("vllm+http://h:1", "policy", Sampling(), keys=ServerKeys("FORGE_TEST_SERVER_KEY"))


# -- generation and weight updates --------------------------------------------------------------
def test_vllm_generation_and_a_full_weight_update_carry_the_key(monkeypatch):
    from forge.rollout.engines.vllm_transfer import VLLMWeightTransfer

    monkeypatch.setenv("FORGE_TEST_SERVER_KEY", KEY)
    seen: list[tuple[str, str | None]] = []
    client = client_over("vllm+http://v:8000", guarded("vllm", seen), ServerKeys("FORGE_TEST_SERVER_KEY"))

    class Trainer:
        async def address(self):
            return "10.0.0.5", 29555

        async def join(self, host, port, world):
            update = VLLM["update_weights"]["request"]["update_info"]
            return update["names"], update["dtype_names"], update["shapes"]

        async def send(self):
            await asyncio.sleep(0)

    async def run():
        result = await client.generate(GenerationRequest(PROMPT, 4))
        trainer = Trainer()
        await VLLMWeightTransfer(trainer.join, trainer.send, trainer.address).update([client], 2)
        await client.close()
        return result

    assert asyncio.run(run()).token_ids
    paths = [path for path, _ in seen]
    assert {"/v1/completions", "/pause", "/update_weights", "/finish_weight_update", "/resume"} <= set(paths)
    assert {given for _, given in seen} == {f"Bearer {KEY}"}


@pytest.mark.parametrize("admin", [False, True])
def test_sglang_sends_the_admin_key_on_its_admin_routes_and_the_api_key_on_the_others(admin, monkeypatch):
    monkeypatch.setenv("FORGE_TEST_SERVER_KEY", KEY)
    monkeypatch.setenv("FORGE_TEST_ADMIN_KEY", ADMIN_KEY)
    keys = ServerKeys("FORGE_TEST_SERVER_KEY", "FORGE_TEST_ADMIN_KEY" if admin else None)
    seen: list[tuple[str, str | None]] = []
    transport = guarded("sglang", seen, admin_key=ADMIN_KEY if admin else None)
    client = client_over("sglang+http://s:30000", transport, keys)

    async def run():
        await client.generate(GenerationRequest(PROMPT, 4))
        await client.load_checkpoint("/shared/forge/v000002", 2)
        await client.load_adapter("/shared/forge/v000003-adapter", 3)
        await client.close()

    asyncio.run(run())
    sent = dict(seen)
    assert sent["/generate"] == f"Bearer {KEY}"
    for path in (
        "/update_weights_from_disk",
        "/pause_generation",
        "/load_lora_adapter",
        "/continue_generation",
    ):
        assert sent[path] == f"Bearer {ADMIN_KEY if admin else KEY}"


def test_an_sglang_admin_route_refusing_the_api_key_names_the_admin_setting(monkeypatch):
    monkeypatch.setenv("FORGE_TEST_SERVER_KEY", KEY)
    transport = guarded("sglang", [], admin_key=ADMIN_KEY)  # started with --admin-api-key too
    client = client_over("sglang+http://s:30000", transport, ServerKeys("FORGE_TEST_SERVER_KEY"))
    with pytest.raises(
        ProtocolError, match=r"--admin-api-key wants that key .* rollout\.server_admin_api_key_env"
    ):
        asyncio.run(client.load_checkpoint("/shared/forge/v000002", 2))


def test_health_and_readmission_probes_carry_the_key(monkeypatch):
    from forge.rollout.engines.health import servers_answer

    monkeypatch.setenv("FORGE_TEST_SERVER_KEY", KEY)
    seen: list[tuple[str, str | None]] = []
    transport = guarded("sglang", seen)
    original = httpx.AsyncClient.__init__

    def with_fake(self, *args, **kwargs):
        original(self, *args, **{**kwargs, "transport": transport})

    monkeypatch.setattr(httpx.AsyncClient, "__init__", with_fake)
    assert servers_answer(["sglang+http://s:30000"], "policy", ServerKeys("FORGE_TEST_SERVER_KEY")) == [True]
    assert seen == [("/health", f"Bearer {KEY}")]


# -- no key in the saved config or on the console --------------------------------------------------
def test_the_saved_config_holds_the_variables_name_never_the_key(monkeypatch):
    monkeypatch.setenv("FORGE_TEST_SERVER_KEY", KEY)
    cfg = remote_config(["vllm+http://h:1"], "rollout.server_api_key_env=FORGE_TEST_SERVER_KEY")
    saved = yaml.safe_dump(cfg.to_dict(), sort_keys=False)  # as forge/run/context.py writes config.yaml
    assert "server_api_key_env: FORGE_TEST_SERVER_KEY" in saved
    assert KEY not in saved


def test_a_key_pasted_in_place_of_its_variables_name_is_refused_without_repeating_it():
    with pytest.raises(ConfigError) as refused:
        remote_config(["vllm+http://h:1"], f"rollout.server_api_key_env={KEY}")
    message = str(refused.value)
    assert "rollout.server_api_key_env: name the environment variable that holds the key" in message
    assert KEY not in message
