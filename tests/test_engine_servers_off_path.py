"""vLLM and SGLang clients off the happy path, against shapes recorded from those projects'
source (tests/fixtures/engines/*.json; each entry's `about` names the file it came from):
server-side sampling defaults, pauses on older servers, aborted requests, error bodies a
cluster user meets, prompts a server cut short, busy servers, restarts, and the check at
connect (the server answers, serves the model, holds the context, has the flags)."""

from __future__ import annotations

import asyncio
import json
import math
import re
from pathlib import Path

import httpx
import pytest

from forge.rollout.engines import sglang_client, vllm_client
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.remote import EngineLost, ProtocolError, RequestAborted, Sampling
from forge.rollout.engines.router import Router

FIXTURES = Path(__file__).parent / "fixtures" / "engines"
VLLM = json.loads((FIXTURES / "vllm.json").read_text())
SGLANG = json.loads((FIXTURES / "sglang.json").read_text())
PROMPT = [2, 6, 9, 10, 11, 3, 2, 7]  # the recorded responses' 8 prompt tokens


def answering(status: int, body: dict) -> httpx.MockTransport:
    return httpx.MockTransport(lambda request: httpx.Response(status, json=body))


def vllm(transport: httpx.MockTransport, url: str = "http://vllm-3:8000") -> vllm_client.VLLMClient:
    client = vllm_client.VLLMClient(url, "policy", Sampling(1.0, 1.0, (3,)))
    hints = client.http.route_hints
    client.http = vllm_client.HttpTransport(url, 10, transport)
    client.http.route_hints = hints
    return client


def sglang(transport: httpx.MockTransport, url: str = "http://sglang-2:30000") -> sglang_client.SGLangClient:
    client = sglang_client.SGLangClient(url, Sampling(1.0, 1.0, (3,)))
    client.http = sglang_client.HttpTransport(url, 10, transport)
    return client


# -- the sampled distribution is the one the trainer assumes ----------------------------------
@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_requests_switch_off_every_sampling_knob_the_server_would_fill_from_generation_config(kind):
    request = GenerationRequest(PROMPT, 4)
    if kind == "vllm":
        sent = vllm_client.completion_call(request, "policy", Sampling(0.9, 0.95)).body
    else:
        sent = sglang_client.generate_call(request, Sampling(0.9, 0.95)).body["sampling_params"]
    # Left unset, Qwen2.5-Instruct's generation_config.json would sample with top_k 20 and
    # repetition_penalty 1.05 on both servers (fixtures' sampling_defaults_about).
    assert {k: sent[k] for k in ("temperature", "top_p")} == {"temperature": 0.9, "top_p": 0.95}
    assert {
        k: sent.get(k)
        for k in ("top_k", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")
    } == {
        "top_k": -1,
        "min_p": 0.0,
        "repetition_penalty": 1.0,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
    }


def forge_engine_logprob(logits: list[float], token: int, temperature: float, top_p: float) -> float:
    """The behaviour logprob Forge's own engine records for `token` (HFEngine's RowSampling)."""
    import torch

    from forge.rollout.engines.sampling import RowSampling

    sampling = RowSampling.of([GenerationRequest([1], 1)], temperature, top_p, torch.device("cpu"))
    _, _, distribution = sampling.sample(torch.tensor([logits]), torch.Generator().manual_seed(0))
    return float(distribution[0, token])


def test_below_top_p_1_sglang_reports_forges_behaviour_logprob_and_vllm_a_renormalised_one():
    """Why a vLLM run needs rollout.top_p 1: its processed logprobs are renormalised over the
    nucleus, SGLang's (and Forge's engine's) are the tempered distribution's own."""
    case = SGLANG["logprobs_at_top_p"]
    ours = forge_engine_logprob(case["logits"], case["sampled_token"], case["temperature"], case["top_p"])
    assert ours == pytest.approx(case["output_logprob"], abs=1e-5)
    case = VLLM["logprobs_at_top_p"]
    assert ours == pytest.approx(case["processed_logprob_at_top_p_1"], abs=1e-5)
    assert case["processed_logprob"] - ours == pytest.approx(-math.log(0.904370), abs=1e-5)


@pytest.mark.parametrize("kind", ["vllm", "sglang"])
def test_a_run_below_top_p_1_is_refused_at_connect_on_vllm_only(kind):
    from forge.config import ConfigError
    from forge.rollout.engines.server_check import check_servers

    cfg = remote_config([f"{kind}+http://h:1"])
    cfg.rollout.top_p = 0.9
    server = models_server(kind, [], sglang_info=SGLANG["server_info"]["response"])
    if kind == "sglang":
        assert check_servers(cfg, server)
        return
    with pytest.raises(
        ConfigError, match=r"rollout.top_p=0.9: vLLM reports .* renormalised .* rollout.top_p: 1.0"
    ):
        check_servers(cfg, server)
    # the same holds for a vLLM that does not show its flags: no flag changes it
    with pytest.raises(ConfigError, match=r"rollout.top_p=0.9"):
        check_servers(cfg, models_server(kind, [], server_info={}))


# -- pauses that wait on every version -----------------------------------------------------------
def test_a_vllm_pause_waits_on_servers_that_read_mode_and_on_those_that_read_only_the_older_flag():
    params = vllm_client.pause_call().params
    assert params["mode"] == "wait"  # newer /pause: mode (default abort)
    assert params["wait_for_inflight_requests"] is True  # older /pause: this flag only (default abort)
    assert httpx.Request("POST", "http://v/pause", params=params).url.query == (
        b"mode=wait&wait_for_inflight_requests=true"
    )


# -- an aborted request loses its episode, not the engine ----------------------------------------
def test_a_request_vllm_aborted_loses_its_episode_and_the_router_keeps_the_server():
    client = vllm(answering(200, VLLM["completion_aborted"]["response"]))
    router = Router([client])

    async def scenario() -> None:
        router.register()
        with pytest.raises(RequestAborted, match="http://vllm-3:8000.*aborted") as lost:
            await router.generate(GenerationRequest(PROMPT, 4, "g/0"))
        assert isinstance(lost.value, EngineLost)  # the agent loop counts the episode as lost
        router.unregister()
        await router.close()

    asyncio.run(scenario())
    assert router.alive == ["http://vllm-3:8000"]


def test_a_request_an_older_sglang_pause_aborted_names_the_server_and_loses_only_its_episode():
    body = SGLANG["generate_aborted_by_an_older_pause"]["response"]
    with pytest.raises(RequestAborted, match="http://sglang-2:30000.*aborted"):
        asyncio.run(sglang(answering(200, body)).generate(GenerationRequest(PROMPT, 4)))


# -- errors a cluster user meets, said with the setting to change --------------------------------
@pytest.mark.parametrize(
    "kind,name",
    [
        ("vllm", "error_response_prompt_too_long"),
        ("vllm", "error_response_older_flat"),
        ("vllm", "error_max_tokens_over_max_model_len"),
        ("sglang", "error_prompt_too_long"),
        ("sglang", "error_prompt_and_max_new_tokens_too_long"),
        ("sglang", "error_prompt_too_long_older"),
    ],
)
def test_a_prompt_over_the_servers_context_is_refused_with_its_message_and_the_settings_to_change(kind, name):
    exchange = (VLLM if kind == "vllm" else SGLANG)[name]
    client = (vllm if kind == "vllm" else sglang)(answering(exchange["status"], exchange["response"]))
    with pytest.raises(ProtocolError) as refused:
        asyncio.run(client.generate(GenerationRequest(PROMPT, 4)))
    message = str(refused.value)
    body = exchange["response"]
    assert (body.get("error") or body)["message"] in message  # the server's words, not its JSON
    assert "rollout.max_context_tokens" in message and "--max-model-len" in message
    assert refused.value.status == 400


def test_a_model_vllm_does_not_serve_is_refused_naming_served_model_name():
    exchange = VLLM["error_model_not_found"]
    with pytest.raises(ProtocolError, match="does not exist.*--served-model-name") as refused:
        asyncio.run(vllm(answering(404, exchange["response"])).generate(GenerationRequest(PROMPT, 4)))
    assert refused.value.status == 404


def test_a_vllm_without_its_dev_routes_is_told_to_set_vllm_server_dev_mode():
    exchange = VLLM["route_missing"]
    with pytest.raises(ProtocolError, match="no /pause: start vllm serve with VLLM_SERVER_DEV_MODE=1"):
        asyncio.run(vllm(answering(404, exchange["response"])).begin_weight_update())


def test_a_server_restarting_is_an_engine_lost_naming_it():
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(EngineLost, match="http://vllm-3:8000.*ConnectError"):
        asyncio.run(vllm(httpx.MockTransport(refuse)).generate(GenerationRequest(PROMPT, 4)))


# -- a prompt the server cut is never trained on -----------------------------------------------
def test_an_answer_to_a_prompt_sglang_auto_truncated_is_refused():
    recorded = SGLANG["generate_auto_truncated"]
    client = sglang(answering(200, recorded["response"]))
    sent = list(range(recorded["sent_prompt_tokens"]))
    with pytest.raises(ProtocolError, match="10 of the 12 prompt tokens.*--allow-auto-truncate"):
        asyncio.run(client.generate(GenerationRequest(sent, 1)))


def test_an_answer_vllm_counts_fewer_prompt_tokens_for_is_refused():
    body = json.loads(json.dumps(VLLM["completion"]["response"]))
    body["usage"]["prompt_tokens"] = 6
    with pytest.raises(ProtocolError, match="6 of the 8 prompt tokens"):
        asyncio.run(vllm(answering(200, body)).generate(GenerationRequest(PROMPT, 4)))


# -- at connect: the server answers, serves the model and holds the run's context --------------
def models_server(
    kind: str, seen: list[str], server_info: dict | None = None, sglang_info: dict | None = None
) -> httpx.MockTransport:
    """A server answering GET /v1/models as recorded, (vLLM) /version and /server_info, and
    (SGLang, when given) /server_info."""
    recorded = (VLLM if kind == "vllm" else SGLANG)["models"]["response"]
    info = server_info if server_info is not None else VLLM["server_info"]["response"]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/models":
            return httpx.Response(200, json=recorded)
        if request.url.path == "/version" and kind == "vllm":
            return httpx.Response(200, json=VLLM["version"]["response"])
        if request.url.path == "/server_info" and kind == "vllm" and info:
            assert request.url.params["config_format"] == "json"
            return httpx.Response(200, json=info)
        if request.url.path == "/server_info" and kind == "sglang" and sglang_info is not None:
            return httpx.Response(200, json=sglang_info)
        return httpx.Response(404, json={"detail": "Not Found"})

    return httpx.MockTransport(handle)


def remote_config(servers: list[str], model: str = "/models/qwen", context: int = 1024):
    from forge.config import load_config

    return load_config(
        "configs/smoke.yaml",
        [
            "rollout.engine=remote",
            f"rollout.servers=[{','.join(servers)}]",
            f"model.path={model}",
            f"rollout.max_context_tokens={context}",
            "rollout.weight_dir=/shared/forge",
            "train.num_gpus=1",
        ],
    )


def test_at_connect_each_server_says_what_it_serves():
    from forge.rollout.engines.server_check import check_servers

    seen: list[str] = []
    cfg = remote_config(["vllm+http://vllm-3:8000"])
    lines = check_servers(cfg, models_server("vllm", seen))
    assert lines == ["vllm+http://vllm-3:8000: vLLM 0.11.2 serving /models/qwen (4096 tokens of context)"]
    assert seen == ["/v1/models", "/version", "/server_info"]
    cfg = remote_config(["sglang+http://sglang-2:30000"])
    assert check_servers(cfg, models_server("sglang", [], sglang_info=SGLANG["server_info"]["response"])) == [
        "sglang+http://sglang-2:30000: SGLang 0.5.6 serving /models/qwen (2048 tokens of context)"
    ]


def test_a_vllm_serving_the_model_under_another_name_is_refused_at_connect_naming_the_flag():
    from forge.config import ConfigError
    from forge.rollout.engines.server_check import check_servers

    cfg = remote_config(["vllm+http://vllm-3:8000"], model="/ckpt/step0")
    with pytest.raises(ConfigError, match=r"serves \['/models/qwen'\].*--served-model-name /ckpt/step0"):
        check_servers(cfg, models_server("vllm", []))


@pytest.mark.parametrize(
    "kind,flag,held", [("vllm", "--max-model-len", 4096), ("sglang", "--context-length", 2048)]
)
def test_a_server_holding_less_context_than_the_run_is_refused_at_connect(kind, flag, held):
    from forge.config import ConfigError
    from forge.rollout.engines.server_check import check_servers

    cfg = remote_config([f"{kind}+http://h:1"], context=8192)
    with pytest.raises(
        ConfigError, match=rf"holds {held} tokens.*its {flag}.*rollout.max_context_tokens=8192"
    ):
        check_servers(cfg, models_server(kind, []))


def test_a_server_that_does_not_answer_or_is_not_that_server_is_refused_at_connect():
    from forge.config import ConfigError
    from forge.rollout.engines.server_check import check_servers

    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    cfg = remote_config(["vllm+http://h:1"])
    with pytest.raises(ConfigError, match="vllm\\+http://h:1: the server did not answer.*ConnectError"):
        check_servers(cfg, httpx.MockTransport(refuse), wait=False)  # a dry run: at once, not in 120 s
    cfg.rollout.engine_timeout_s = 0.01  # how long a run waits for a server still starting
    with pytest.raises(ConfigError, match="did not answer within 0.01s"):
        check_servers(cfg, httpx.MockTransport(refuse))
    not_found = answering(404, {"detail": "Not Found"})
    with pytest.raises(ConfigError, match="did not answer as SGLang does"):
        check_servers(remote_config(["sglang+http://h:1"]), not_found)
    # forge serve entries are Forge's own: nothing is probed
    assert check_servers(remote_config(["http://h:1"]), not_found) == []


def test_forge_train_refuses_a_vllm_serving_another_name_before_anything_starts():
    """Over real HTTP: a stand-in answering GET /v1/models as vLLM does, then `preflight`
    (what `forge train` and `--dry-run` run first)."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from forge.config import ConfigError
    from forge.run.launch import preflight

    class Models(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            body = json.dumps(VLLM["models"]["response"] if self.path == "/v1/models" else {}).encode()
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Models)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cfg = remote_config(
            [f"vllm+http://127.0.0.1:{server.server_address[1]}"], model="runs/smoke/initial_model"
        )
        with pytest.raises(ConfigError, match="--served-model-name runs/smoke/initial_model"):
            preflight(cfg)
    finally:
        server.shutdown()
        server.server_close()


# -- LoRA on vLLM: the refusal that matters is the one reported ---------------------------------
def lora_server(answer: dict, seen: list[str]) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/v1/load_lora_adapter" and seen.count("/v1/load_lora_adapter") == 1:
            return httpx.Response(answer["status"], json=answer["response"])
        if request.url.path == "/v1/unload_lora_adapter":
            return httpx.Response(200, text=VLLM["unload_lora_adapter"]["response_text"])
        if request.url.path == "/v1/load_lora_adapter":
            return httpx.Response(200, text=VLLM["load_lora_adapter"]["response_text"])
        return httpx.Response(200, json={"status": "ok"})

    return httpx.MockTransport(handle)


def test_a_vllm_adapter_folder_the_server_cannot_read_is_reported_and_generation_resumes():
    seen: list[str] = []
    client = vllm(lora_server(VLLM["load_lora_adapter_not_found"], seen))
    with pytest.raises(ProtocolError, match="No adapter found for .*rollout.weight_dir") as refused:
        asyncio.run(client.load_adapter("/shared/forge/v000003-adapter", 3))
    assert refused.value.status == 404
    assert seen == ["/pause", "/v1/load_lora_adapter", "/resume"]  # no unload: that would hide this error
    assert client.model == "policy" and client.policy_version == 0


def test_a_vllm_without_load_inplace_gets_the_new_version_by_unload_then_load():
    seen: list[str] = []
    client = vllm(lora_server(VLLM["load_lora_adapter_already_loaded"], seen))
    asyncio.run(client.load_adapter("/shared/forge/v000003-adapter", 3))
    assert seen == [
        "/pause",
        "/v1/load_lora_adapter",
        "/v1/unload_lora_adapter",
        "/v1/load_lora_adapter",
        "/resume",
    ]
    assert client.model == "policy-forge-lora" and client.policy_version == 3


# -- a busy server is asked again; a server that stays busy is lost ------------------------------
def busy_then(answer: httpx.Response, busy_times: int, seen: list[int]) -> httpx.MockTransport:
    busy = SGLANG["generate_queue_full"]

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(1)
        if len(seen) <= busy_times:
            return httpx.Response(busy["status"], json=busy["response"])
        return answer

    return httpx.MockTransport(handle)


def test_a_full_sglang_queue_is_waited_out_and_the_request_sent_again():
    seen: list[int] = []
    client = sglang(busy_then(httpx.Response(200, json=SGLANG["generate"]["response"]), 2, seen))
    client.http.busy_retry_delays_s = (0.0, 0.0, 0.0)
    result = asyncio.run(client.generate(GenerationRequest(PROMPT, 4)))
    assert result.token_ids == [27, 3] and len(seen) == 3


def test_a_server_busy_past_its_retries_is_lost_with_its_own_words():
    seen: list[int] = []
    client = sglang(busy_then(httpx.Response(200, json={}), 99, seen))
    client.http.busy_retry_delays_s = (0.0, 0.0)
    with pytest.raises(EngineLost, match="answered 503: The request queue is full."):
        asyncio.run(client.generate(GenerationRequest(PROMPT, 4)))
    assert len(seen) == 3


def test_a_vllm_that_lost_forges_adapter_in_a_restart_is_lost_not_an_episode_error():
    """Runtime LoRA adapters do not survive a vLLM restart: requests naming the adapter then
    get the 404 of an unserved model (error_model_not_found's shape)."""
    gone = {"error": {**VLLM["error_model_not_found"]["response"]["error"]}}
    gone["error"]["message"] = "The model `policy-forge-lora` does not exist."
    client = vllm(answering(404, gone))
    client.use_adapter(3)
    with pytest.raises(
        EngineLost, match="http://vllm-3:8000.*no LoRA adapter 'policy-forge-lora'.*restarted"
    ):
        asyncio.run(client.generate(GenerationRequest(PROMPT, 4)))
    base = vllm(answering(404, VLLM["error_model_not_found"]["response"]))  # no adapter: a naming mistake
    with pytest.raises(ProtocolError, match="--served-model-name"):
        asyncio.run(base.generate(GenerationRequest(PROMPT, 4)))


def test_an_sglang_that_lost_forges_adapter_in_a_restart_is_lost_not_an_episode_error():
    """SGLang refuses a request naming an adapter it has not loaded (400) and lists the ones it
    has: none of Forge's after a restart (the engine is lost; before, every episode sent there
    failed one by one while the server stayed in the pool), newer ones when only this worker's
    version was unloaded since (that episode's error; the engine stays)."""
    client = sglang(answering(400, SGLANG["error_lora_not_loaded_after_a_restart"]["response"]))
    client.use_adapter(3)
    with pytest.raises(EngineLost, match="http://sglang-2:30000.*no LoRA adapter 'forge-v3'.*restarted"):
        asyncio.run(client.generate(GenerationRequest(PROMPT, 4)))
    stale = sglang(answering(400, SGLANG["error_lora_not_loaded_an_older_version"]["response"]))
    stale.use_adapter(3)
    with pytest.raises(ProtocolError, match="not loaded: forge-v3") as refused:
        asyncio.run(stale.generate(GenerationRequest(PROMPT, 4)))
    assert not isinstance(refused.value, EngineLost) and refused.value.status == 400


def test_an_sglang_that_no_longer_lists_forges_adapter_holds_version_0():
    """With an adapter in use, GET /v1/models tells whether the server still has it (a restart
    drops runtime adapters): 0 when it does not, so the router keeps it out until the next
    sync loads it again; before, it said None (cannot say) and took the server back."""
    listed = sglang(answering(200, SGLANG["models_with_an_adapter"]["response"]))
    listed.use_adapter(3)
    assert asyncio.run(listed.held_version()) is None  # it has forge-v3: which version, the driver knows
    restarted = sglang(answering(200, SGLANG["models"]["response"]))
    restarted.use_adapter(3)
    assert asyncio.run(restarted.held_version()) == 0


def model_info_server(*exchanges: dict, seen: list[str]) -> httpx.MockTransport:
    routes = {exchange["path"]: exchange for exchange in exchanges}

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        exchange = routes.get(request.url.path, SGLANG["model_info_route_missing"])
        return httpx.Response(exchange.get("status", 200), json=exchange["response"])

    return httpx.MockTransport(handle)


def test_sglang_is_asked_its_weight_version_at_model_info_not_the_deprecated_name():
    """Current SGLang answers GET /model_info and still /get_model_info, logging a deprecation
    warning on each call (every version probe, every rollout); Forge asked only the old name."""
    seen: list[str] = []
    client = sglang(model_info_server(SGLANG["model_info"], SGLANG["get_model_info"], seen=seen))
    assert asyncio.run(client.held_version()) == 4
    assert seen == ["/model_info"]


def test_an_sglang_older_than_model_info_is_asked_by_the_older_name():
    seen: list[str] = []
    client = sglang(model_info_server(SGLANG["get_model_info"], seen=seen))
    assert asyncio.run(client.held_version()) == 4
    assert asyncio.run(client.held_version()) == 4
    assert seen == ["/model_info", "/get_model_info", "/get_model_info"]  # the 404 is not asked again


def test_a_dropped_sglang_still_warming_up_stays_out_saying_so():
    """A restarted SGLang listens before it is ready: while it warms up its GET /health
    answers 503 with no body (recorded), which the router said was no answer at all."""
    starting = SGLANG["health_while_starting"]
    client = sglang(httpx.MockTransport(lambda request: httpx.Response(starting["status"], text="")))
    client.http.busy_retry_delays_s = ()
    router = Router([client])
    router._drop(0, "ConnectError: connection refused")
    router.engines[0].next_check = 0.0
    assert asyncio.run(router._check_dropped(None)) == []
    assert "GET /health did not answer 200 (down, or still starting)" in router.engines[0].lost_reason


def server_info_with(**changes: object) -> dict:
    info = json.loads(json.dumps(VLLM["server_info"]["response"]))
    for path, value in changes.items():
        section, key = path.split("__") if "__" in path else (path, None)
        if section == "env":
            info["vllm_env"][key] = value
        elif key is None:
            info["vllm_config"][section] = value
        else:
            info["vllm_config"][section][key] = value
    return info


@pytest.mark.parametrize(
    "lora,change,said",
    [
        (False, {"model_config__logprobs_mode": "raw_logprobs"}, "--logprobs-mode processed_logprobs"),
        (False, {"model_config__logprobs_mode": "processed_logits"}, "after temperature, not normalised"),
        (False, {"weight_transfer_config": None}, '--weight-transfer-config \'{"backend": "nccl"}\''),
        (True, {"lora_config": None}, "--enable-lora"),
        (True, {"lora_config__max_lora_rank": 8}, "--max-lora-rank 8 is below model.lora.r=16"),
        (True, {"env__VLLM_ALLOW_RUNTIME_LORA_UPDATING": False}, "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"),
    ],
)
def test_a_vllm_started_without_a_flag_the_run_needs_is_refused_at_connect_naming_it(lora, change, said):
    from forge.config import ConfigError
    from forge.rollout.engines.server_check import check_servers

    cfg = remote_config(["vllm+http://h:1"])
    if lora:
        cfg.model.lora.enabled, cfg.model.lora.r = True, 16
    with pytest.raises(ConfigError, match=re.escape(said)):
        check_servers(cfg, models_server("vllm", [], server_info_with(**change)))
    check_servers(cfg, models_server("vllm", []))  # as recorded: every flag there


def test_a_vllm_that_does_not_show_its_flags_is_let_through_saying_so():
    from forge.rollout.engines.server_check import check_servers

    lines = check_servers(remote_config(["vllm+http://h:1"]), models_server("vllm", [], server_info={}))
    assert lines[0].endswith("its flags not shown (GET /server_info), so not checked")


def test_a_server_still_starting_is_waited_for_up_to_the_engine_timeout(capsys):
    from forge.config import ConfigError
    from forge.rollout.engines.server_check import Needs, probe

    attempts: list[str] = []
    answering_later = models_server("sglang", [])

    def starting(request: httpx.Request) -> httpx.Response:
        attempts.append(request.url.path)
        if len(attempts) <= 2:  # not listening yet: the model is still loading
            raise httpx.ConnectError("connection refused", request=request)
        return answering_later.handler(request)

    needs = Needs("/models/qwen", 1024)
    line = asyncio.run(
        probe("sglang+http://h:1", needs, httpx.MockTransport(starting), wait_s=5, poll_s=0.01)
    )
    assert line.startswith("sglang+http://h:1: SGLang serving /models/qwen")
    assert attempts[:3] == ["/v1/models"] * 3  # refused twice, then answered
    assert "forge: waiting up to 5s for sglang+http://h:1 to answer" in capsys.readouterr().err

    def never(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(ConfigError, match=r"did not answer within 0.05s \(rollout.engine_timeout_s\)"):
        asyncio.run(probe("sglang+http://h:1", needs, httpx.MockTransport(never), wait_s=0.05, poll_s=0.01))


# -- full weights: a vLLM that restarted between updates is found and regrouped ----------------
def test_a_vllm_that_restarted_since_the_last_update_is_regrouped_not_the_run_lost(capsys):
    """A restarted server left the NCCL group and holds its checkpoint again: without a new
    group its /update_weights fails (every vLLM of the run was dropped for it). Its
    /weight_info (None after a restart) tells, and the group is formed afresh."""
    from forge.rollout.engines.vllm_transfer import VLLMWeightTransfer

    restarted = {"now": False}
    seen: list[str] = []
    recorded = {
        (e["method"], e["path"]): e
        for e in (
            VLLM["get_world_size"],
            VLLM["init_weight_transfer_engine"],
            VLLM["pause"],
            VLLM["start_weight_update"],
            VLLM["update_weights"],
            VLLM["finish_weight_update"],
            VLLM["resume"],
        )
    }

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.path)
        if request.url.path == "/weight_info":
            held = VLLM["weight_info_after_a_restart" if restarted["now"] else "weight_info"]["response"]
            return httpx.Response(200, json=held)
        return httpx.Response(200, json=recorded[(request.method, request.url.path)]["response"])

    joined: list[int] = []

    async def join(host, port, world):
        joined.append(world)
        info = VLLM["update_weights"]["request"]["update_info"]
        return info["names"], info["dtype_names"], info["shapes"]

    async def send():
        return None

    async def address():
        return "10.0.0.5", 29555

    transfer = VLLMWeightTransfer(join, send, address)

    def fresh_client() -> vllm_client.VLLMClient:  # the driver makes new clients at each sync
        return vllm(httpx.MockTransport(handle), url="http://a:8000")

    asyncio.run(transfer.update([fresh_client()], 3))
    assert joined == [2] and transfer.reporting == {"http://a:8000"}
    seen.clear()
    restarted["now"] = True
    asyncio.run(transfer.update([fresh_client()], 4))
    assert joined == [2, 2]  # the trainer formed a new group with it
    assert seen[:3] == ["/weight_info", "/get_world_size", "/init_weight_transfer_engine"]
    assert "http://a:8000 holds weights None, not version 3 (restarted?)" in capsys.readouterr().err


# -- many episodes on one server: none waits on the client's own connection pool ----------------
def test_more_turns_in_flight_than_httpx_pools_by_default_all_reach_the_server_together():
    """A rollout worker sends each live episode's turn to a vLLM / SGLang server as its own
    request (those servers batch them). httpx pools 100 connections by default and counts the
    wait for one against the timeout, so past 100 live episodes turns queued in the client
    and, once a wave took longer than the timeout, an answering engine was lost. Over real
    HTTP: 150 turns to a server that holds each 2.5 s reach it together."""
    body = json.dumps(SGLANG["generate"]["response"]).encode()

    async def scenario() -> tuple[int, int]:
        in_flight = {"now": 0, "most": 0}

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    head = await reader.readuntil(b"\r\n\r\n")
                    length = int(re.search(rb"content-length: (\d+)", head.lower()).group(1))
                    await reader.readexactly(length)
                    in_flight["now"] += 1
                    in_flight["most"] = max(in_flight["most"], in_flight["now"])
                    await asyncio.sleep(2.5)
                    in_flight["now"] -= 1
                    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
                    writer.write(head.encode() + body)
                    await writer.drain()
            except (asyncio.IncompleteReadError, ConnectionError):
                pass  # the client closed a kept-alive connection

        server = await asyncio.start_server(serve, "127.0.0.1", 0, backlog=512)
        port = server.sockets[0].getsockname()[1]
        client = sglang_client.SGLangClient(
            f"http://127.0.0.1:{port}", Sampling(1.0, 1.0, (3,)), timeout_s=30
        )
        try:
            results = await asyncio.gather(
                *(client.generate(GenerationRequest(PROMPT, 4)) for _ in range(150)), return_exceptions=True
            )
        finally:
            await client.close()
            server.close()
        return sum(not isinstance(r, GenerationResult) for r in results), in_flight["most"]

    failed, most = asyncio.run(scenario())
    assert failed == 0
    assert most > 100  # before: exactly 100 at a time, the rest waiting in the client


def test_sglang_holds_two_tokens_less_than_its_context_length():
    """SGLang serves a request of at most context_len - 1 tokens and cuts generation one before
    that (Scheduler.max_req_len, init_req_max_new_tokens): a run whose turns fill its
    --context-length exactly would have the last two tokens of a long turn cut."""
    from forge.config import ConfigError
    from forge.rollout.engines.server_check import check_servers

    held = SGLANG["models"]["response"]["data"][0]["max_model_len"]  # 2048
    check_servers(remote_config(["sglang+http://h:1"], context=held - 2), models_server("sglang", []))
    with pytest.raises(
        ConfigError, match=rf"less the 2 SGLang keeps back, {held - 2}.*--context-length >= {held + 2}"
    ):
        check_servers(remote_config(["sglang+http://h:1"], context=held), models_server("sglang", []))


@pytest.mark.parametrize(
    "change,said",
    [
        ({"allow_auto_truncate": True}, "--allow-auto-truncate"),
        ({"max_total_num_tokens": 1000}, "its KV cache holds 1000 tokens (max_total_num_tokens)"),
    ],
)
def test_an_sglang_that_would_cut_prompts_or_cannot_hold_one_request_is_refused_at_connect(change, said):
    from forge.config import ConfigError
    from forge.rollout.engines.server_check import check_servers

    info = {**SGLANG["server_info"]["response"], **change}
    with pytest.raises(ConfigError, match=re.escape(said)):
        check_servers(remote_config(["sglang+http://h:1"]), models_server("sglang", [], sglang_info=info))
