"""The vLLM and SGLang clients against recorded shapes of those servers' APIs
(tests/fixtures/engines/*.json, written from their documentation and source): every
request Forge builds is the recorded one, every recorded response parses to the ids,
logprobs, finish and version it holds, and the update sequences go in the right order."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import httpx
import pytest

from forge.rollout.engines import sglang_client, vllm_client
from forge.rollout.engines.clients import make_client
from forge.rollout.engines.protocol import GenerationRequest
from forge.rollout.engines.remote import EngineLost, ForgeClient, ProtocolError, Sampling

FIXTURES = Path(__file__).parent / "fixtures" / "engines"
VLLM = json.loads((FIXTURES / "vllm.json").read_text())
SGLANG = json.loads((FIXTURES / "sglang.json").read_text())


def call_as_recorded(call, exchange: dict) -> None:
    assert (call.method, call.path) == (exchange["method"], exchange["path"])
    assert call.body == exchange.get("request")
    assert (call.params or None) == exchange.get("params")


def replay(exchanges: list[dict], seen: list[tuple[str, str, object]]) -> httpx.MockTransport:
    """A server that answers each (method, path) with its recorded response, in order."""
    queue = {(e["method"], e["path"]): e for e in exchanges}

    def handle(request: httpx.Request) -> httpx.Response:
        exchange = queue[(request.method, request.url.path)]
        body = json.loads(request.content) if request.content else None
        seen.append((request.method, request.url.path, body))
        if "response_text" in exchange:
            return httpx.Response(200, text=exchange["response_text"])
        return httpx.Response(exchange.get("status", 200), json=exchange["response"])

    return httpx.MockTransport(handle)


# -- vLLM ---------------------------------------------------------------------------------
def test_vllm_completion_request_is_the_recorded_token_prompt_request():
    given = VLLM["completion"]["given"]
    request = GenerationRequest(given["token_ids"], given["max_new_tokens"], given["episode_id"])
    sampling = Sampling(given["temperature"], given["top_p"], tuple(given["stop_token_ids"]))
    call_as_recorded(vllm_client.completion_call(request, given["model"], sampling), VLLM["completion"])


@pytest.mark.parametrize("name", ["completion", "completion_cut_by_max_tokens_older_server"])
def test_vllm_completion_responses_parse_to_the_sampled_ids_and_logprobs(name):
    expected = VLLM[name]["expected"]
    result = vllm_client.parse_completion(VLLM[name]["response"], (3,), policy_version=7)
    assert (result.token_ids, result.logprobs, result.finished) == (
        expected["token_ids"],
        expected["logprobs"],
        expected["finished"],
    )
    assert result.policy_version == 7  # vLLM knows no versions: the client's own


def test_vllm_tokens_as_text_are_refused_not_retokenized():
    with pytest.raises(ProtocolError, match=VLLM["completion_without_token_ids"]["error"]):
        vllm_client.parse_completion(VLLM["completion_without_token_ids"]["response"], (3,), 0)


def test_vllm_token_ids_that_disagree_with_the_logprob_tokens_are_refused():
    body = json.loads(json.dumps(VLLM["completion"]["response"]))
    body["choices"][0]["token_ids"] = [27, 4]
    with pytest.raises(ProtocolError, match="disagree"):
        vllm_client.parse_completion(body, (3,), 0)


def test_vllm_control_requests_are_the_recorded_ones():
    call_as_recorded(
        vllm_client.load_adapter_call("policy-forge-lora", "/shared/forge/v000003"), VLLM["load_lora_adapter"]
    )
    call_as_recorded(vllm_client.unload_adapter_call("policy-forge-lora"), VLLM["unload_lora_adapter"])
    call_as_recorded(vllm_client.pause_call(), VLLM["pause"])
    call_as_recorded(vllm_client.resume_call(), VLLM["resume"])
    call_as_recorded(vllm_client.world_size_call(), VLLM["get_world_size"])
    call_as_recorded(
        vllm_client.init_weight_transfer_call("10.0.0.5", 29555, 1, 2), VLLM["init_weight_transfer_engine"]
    )
    update = VLLM["update_weights"]["request"]["update_info"]
    call_as_recorded(
        vllm_client.update_weights_call(update["names"], update["dtype_names"], update["shapes"]),
        VLLM["update_weights"],
    )


def test_the_vllm_client_generates_and_loads_an_adapter_paused():
    seen: list = []
    transport = replay([VLLM["completion"], VLLM["pause"], VLLM["load_lora_adapter"], VLLM["resume"]], seen)
    client = make_client("vllm+http://vllm:8000", "policy", Sampling(1.0, 1.0, (3,)))
    client.http = vllm_client.HttpTransport("http://vllm:8000", 10, transport)

    async def scenario() -> None:
        given = VLLM["completion"]["given"]
        result = await client.generate(GenerationRequest(given["token_ids"], 4, given["episode_id"]))
        assert result.token_ids == [27, 3] and result.prefill_tokens == 2
        await client.load_adapter("/shared/forge/v000003", 3)
        assert client.policy_version == 3 and client.model == "policy-forge-lora"

    asyncio.run(scenario())
    assert [path for _, path, _ in seen] == ["/v1/completions", "/pause", "/v1/load_lora_adapter", "/resume"]
    assert seen[0][2] == VLLM["completion"]["request"]


def test_a_vllm_error_response_is_a_protocol_error_naming_the_server():
    seen: list = []
    exchange = {**VLLM["error_response"], "method": "POST", "path": "/v1/completions"}
    client = vllm_client.VLLMClient("http://vllm:8000", "policy", Sampling())
    client.http = vllm_client.HttpTransport("http://vllm:8000", 10, replay([exchange], seen))
    with pytest.raises(ProtocolError, match="maximum context length"):
        asyncio.run(client.generate(GenerationRequest([1] * 8, 4)))


def test_vllm_full_weights_from_a_folder_are_refused_with_the_way_that_works():
    client = vllm_client.VLLMClient("http://vllm:8000", "policy", Sampling())
    with pytest.raises(ProtocolError, match="weight-transfer"):
        asyncio.run(client.load_checkpoint("/tmp/x", 1))


def test_vllm_full_weight_update_requests_are_the_recorded_ones():
    call_as_recorded(vllm_client.start_weight_update_call(), VLLM["start_weight_update"])
    call_as_recorded(vllm_client.finish_weight_update_call(3), VLLM["finish_weight_update"])


def vllm_for_transfer(url: str, world_size: str, seen: list, older: bool = False, failing: bool = False):
    start = VLLM["start_weight_update_older_server" if older else "start_weight_update"]
    finish = VLLM["finish_weight_update_older_server" if older else "finish_weight_update"]
    update = (
        {**VLLM["update_weights"], "status": 500, "response": {"error": "NCCL error"}}
        if failing
        else VLLM["update_weights"]
    )
    exchanges = [
        VLLM[world_size],
        VLLM["init_weight_transfer_engine"],
        VLLM["pause"],
        start,
        update,
        finish,
        VLLM["resume"],
        VLLM["weight_info"],
    ]
    client = vllm_client.VLLMClient(url, "policy", Sampling())
    client.http = vllm_client.HttpTransport(url, 10, replay(exchanges, seen))
    return client


class FakeTrainer:
    """The trainer's side of vllm_transfer: records the group it joined and each broadcast."""

    def __init__(self, clients_seen: list[list]) -> None:
        self.clients_seen = clients_seen
        self.joined: list[tuple] = []
        self.sent_while: list[list[str]] = []

    async def address(self):
        return "10.0.0.5", 29555

    async def join(self, host, port, world):
        self.joined.append((host, port, world))
        update = VLLM["update_weights"]["request"]["update_info"]
        return update["names"], update["dtype_names"], update["shapes"]

    async def send(self):
        await asyncio.sleep(0)  # the servers' update_weights calls are in flight meanwhile
        self.sent_while.append([seen[-1][1] for seen in self.clients_seen])


def test_a_vllm_full_weight_update_pauses_opens_receives_the_broadcast_closes_with_the_version_and_resumes():
    from forge.rollout.engines.vllm_transfer import VLLMWeightTransfer

    seen_a, seen_b = [], []
    clients = [
        vllm_for_transfer("http://a:8000", "get_world_size", seen_a),
        vllm_for_transfer("http://b:8000", "get_world_size_tp2", seen_b),
    ]
    trainer = FakeTrainer([seen_a, seen_b])
    transfer = VLLMWeightTransfer(trainer.join, trainer.send, trainer.address)

    asyncio.run(transfer.update(clients, 3))
    assert trainer.joined == [("10.0.0.5", 29555, 4)]  # trainer + 1 rank of a + 2 of b
    inits = [
        body["init_info"]
        for seen in (seen_a, seen_b)
        for _, path, body in seen
        if path == "/init_weight_transfer_engine"
    ]
    assert [(i["rank_offset"], i["world_size"]) for i in inits] == [(1, 4), (2, 4)]  # b holds ranks 2 and 3
    assert [path for _, path, _ in seen_a] == [
        "/get_world_size",
        "/init_weight_transfer_engine",
        "/pause",
        "/start_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/resume",
    ]
    assert [body for _, path, body in seen_a if path == "/update_weights"] == [
        VLLM["update_weights"]["request"]
    ]
    assert [body for _, path, body in seen_b if path == "/finish_weight_update"] == [{"weight_version": "3"}]
    assert [c.policy_version for c in clients] == [3, 3]
    # The broadcast ran once both servers had opened the update and before either closed it.
    assert len(trainer.sent_while) == 1
    assert set(trainer.sent_while[0]) <= {"/start_weight_update", "/update_weights"}

    seen_a.clear()
    asyncio.run(transfer.update(clients, 4))  # each still holds version 3: the group stands, no second init
    assert [path for _, path, _ in seen_a] == [
        "/weight_info",
        "/pause",
        "/start_weight_update",
        "/update_weights",
        "/finish_weight_update",
        "/resume",
    ]
    assert len(trainer.joined) == 1 and clients[0].policy_version == 4


def test_a_vllm_server_older_than_start_and_finish_is_updated_without_them():
    from forge.rollout.engines.vllm_transfer import VLLMWeightTransfer

    seen: list = []
    client = vllm_for_transfer("http://a:8000", "get_world_size", seen, older=True)
    trainer = FakeTrainer([seen])
    asyncio.run(VLLMWeightTransfer(trainer.join, trainer.send, trainer.address).update([client], 2))
    assert client.policy_version == 2 and seen[-1][1] == "/resume"


def test_a_failed_vllm_transfer_resumes_the_servers_keeps_the_old_version_and_regroups_next_time():
    from forge.rollout.engines.vllm_transfer import VLLMWeightTransfer, WeightTransferFailed

    seen: list = []
    client = vllm_for_transfer("http://a:8000", "get_world_size", seen, failing=True)
    trainer = FakeTrainer([seen])
    transfer = VLLMWeightTransfer(trainer.join, trainer.send, trainer.address)
    with pytest.raises(WeightTransferFailed, match="http://a:8000: EngineLost: .*NCCL error") as failed:
        asyncio.run(transfer.update([client], 5))
    assert isinstance(failed.value.failed["http://a:8000"], EngineLost)
    assert seen[-1][1] == "/resume" and "/finish_weight_update" not in [p for _, p, _ in seen]
    assert client.policy_version == 0 and transfer.members is None


def test_vllm_weight_metadata_names_dtypes_and_shapes_in_send_order():
    import torch

    from forge.rollout.engines.vllm_transfer import weight_metadata

    names, dtypes, shapes = weight_metadata(
        {"b": torch.zeros(2, 3, dtype=torch.bfloat16), "a": torch.zeros(4)}
    )
    assert (names, dtypes, shapes) == (["a", "b"], ["float32", "bfloat16"], [[4], [2, 3]])


# -- SGLang -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["generate", "generate_with_lora"])
def test_sglang_generate_requests_are_the_recorded_ones(name):
    given = SGLANG[name]["given"]
    request = GenerationRequest(given["token_ids"], given["max_new_tokens"])
    sampling = Sampling(given["temperature"], given["top_p"], tuple(given["stop_token_ids"]))
    call_as_recorded(sglang_client.generate_call(request, sampling, given["lora_name"]), SGLANG[name])


@pytest.mark.parametrize("name", ["generate", "generate_cut_by_length_default_version"])
def test_sglang_generate_responses_parse_to_ids_logprobs_and_the_servers_version(name):
    expected = SGLANG[name]["expected"]
    result = sglang_client.parse_generate(SGLANG[name]["response"], (3,), policy_version=0)
    assert (
        result.token_ids,
        result.logprobs,
        result.finished,
        result.policy_version,
        result.prefill_tokens,
    ) == (
        expected["token_ids"],
        expected["logprobs"],
        expected["finished"],
        expected["policy_version"],
        expected["prefill_tokens"],
    )


def test_an_aborted_sglang_request_loses_the_episode():
    with pytest.raises(EngineLost, match=SGLANG["generate_aborted"]["error"]):
        sglang_client.parse_generate(SGLANG["generate_aborted"]["response"], (3,), 0)


def test_sglang_control_requests_are_the_recorded_ones():
    call_as_recorded(
        sglang_client.update_from_disk_call("/shared/forge/v000004", 4), SGLANG["update_weights_from_disk"]
    )
    call_as_recorded(
        sglang_client.load_adapter_call("forge-v3", "/shared/forge/v000003"), SGLANG["load_lora_adapter"]
    )
    call_as_recorded(sglang_client.unload_adapter_call("forge-v2"), SGLANG["unload_lora_adapter"])
    call_as_recorded(sglang_client.pause_call(), SGLANG["pause_generation"])
    call_as_recorded(sglang_client.continue_call(), SGLANG["continue_generation"])


def test_a_failed_sglang_update_says_why():
    with pytest.raises(ProtocolError, match=SGLANG["update_weights_from_disk_failed"]["error"]):
        sglang_client.check_success(
            SGLANG["update_weights_from_disk_failed"]["response"], "update_weights_from_disk"
        )


def test_the_sglang_client_updates_from_disk_loads_adapters_paused_and_unloads_one_when_asked():
    seen: list = []
    exchanges = [
        SGLANG["update_weights_from_disk"],
        SGLANG["pause_generation"],
        SGLANG["load_lora_adapter"],
        SGLANG["continue_generation"],
        SGLANG["unload_lora_adapter"],
        SGLANG["generate_with_lora"] | {"response": SGLANG["generate"]["response"]},
    ]
    client = make_client("sglang+http://sglang:30000", "policy", Sampling(0.7, 0.95, (3,)))
    client.http = sglang_client.HttpTransport("http://sglang:30000", 10, replay(exchanges, seen))

    async def scenario() -> None:
        await client.load_checkpoint("/shared/forge/v000004", 4)
        assert client.policy_version == 4
        client.lora_name = "forge-v2"
        await client.load_adapter("/shared/forge/v000003", 3)
        assert client.lora_name == "forge-v3"
        await client.unload_adapter(2)  # the driver's, once no request can name it
        result = await client.generate(GenerationRequest(SGLANG["generate"]["given"]["token_ids"], 2))
        assert result.policy_version == 4  # stamped by the server (its weight_version)

    asyncio.run(scenario())
    assert [path for _, path, _ in seen] == [
        "/update_weights_from_disk",
        "/pause_generation",
        "/load_lora_adapter",
        "/continue_generation",
        "/unload_lora_adapter",
        "/generate",
    ]
    assert seen[-1][2]["lora_path"] == "forge-v3"


# -- the spec strings ------------------------------------------------------------------------
def test_server_entries_name_their_kind():
    assert isinstance(make_client("http://h:1", "m", Sampling()), ForgeClient)
    assert isinstance(make_client("vllm+http://h:1", "m", Sampling()), vllm_client.VLLMClient)
    assert isinstance(make_client("sglang+https://h:1", "m", Sampling()), sglang_client.SGLangClient)
    with pytest.raises(ValueError, match="unknown server kind"):
        make_client("tgi+http://h:1", "m", Sampling())
    with pytest.raises(ValueError, match="write http://host:port"):
        make_client("h:1", "m", Sampling())


# -- a gateway's call: stop strings, seeds, top logprobs, the client's own sampling ---------
def gateway_request(given: dict) -> tuple[GenerationRequest, Sampling]:
    request = GenerationRequest(
        given["token_ids"],
        given["max_new_tokens"],
        given.get("episode_id", ""),
        temperature=given["temperature"],
        seed=given["seed"],
        top_logprobs=given["top_logprobs"],
        stop=given["stop"],
    )
    return request, Sampling(given["run_temperature"], given["run_top_p"], tuple(given["stop_token_ids"]))


def test_a_gateway_call_on_vllm_sends_its_stop_seed_top_logprobs_and_own_temperature():
    exchange = VLLM["completion_for_a_gateway_call"]
    request, sampling = gateway_request(exchange["given"])
    call_as_recorded(vllm_client.completion_call(request, exchange["given"]["model"], sampling), exchange)


def test_vllm_top_logprobs_parse_to_the_k_most_likely_of_each_step_whatever_was_sampled():
    exchange = VLLM["completion_for_a_gateway_call"]
    result = vllm_client.parse_completion(exchange["response"], (3,), 5, top_logprobs=2)
    expected = exchange["expected"]
    assert (result.token_ids, result.logprobs, result.finished) == (
        expected["token_ids"],
        expected["logprobs"],
        expected["finished"],
    )  # ended on a stop string, not a stop id
    assert result.top_logprobs == [[tuple(pair) for pair in step] for step in expected["top_logprobs"]]
    body = json.loads(json.dumps(exchange["response"]))
    body["choices"][0]["logprobs"]["top_logprobs"] = [None, None, None]
    with pytest.raises(ProtocolError, match="top_logprobs"):
        vllm_client.parse_completion(body, (3,), 5, top_logprobs=2)


def test_a_gateway_call_on_sglang_sends_its_stop_seed_top_logprobs_and_own_temperature():
    exchange = SGLANG["generate_for_a_gateway_call"]
    request, sampling = gateway_request(exchange["given"])
    call_as_recorded(sglang_client.generate_call(request, sampling), exchange)


def test_sglang_output_top_logprobs_parse_to_the_k_most_likely_of_each_step():
    exchange = SGLANG["generate_for_a_gateway_call"]
    result = sglang_client.parse_generate(exchange["response"], (3,), 0, top_logprobs=2)
    expected = exchange["expected"]
    assert (result.token_ids, result.logprobs, result.finished, result.policy_version) == (
        expected["token_ids"],
        expected["logprobs"],
        expected["finished"],
        expected["policy_version"],
    )
    assert result.top_logprobs == [[tuple(pair) for pair in step] for step in expected["top_logprobs"]]
    body = json.loads(json.dumps(exchange["response"]))
    del body["meta_info"]["output_top_logprobs"]
    with pytest.raises(ProtocolError, match="output_top_logprobs"):
        sglang_client.parse_generate(body, (3,), 0, top_logprobs=2)


# -- LoRA runs on vLLM: each version's adapter from a shared folder ----------------------
def test_a_lora_version_reaches_vllm_servers_as_the_adapter_folder_the_trainer_wrote(tmp_path):
    from forge.config import load_config
    from forge.rollout.engines.pool import EnginePool

    cfg = load_config(
        "configs/smoke.yaml",
        [
            "rollout.engine=remote",
            "rollout.servers=[vllm+http://vllm:8000]",
            "model.lora.enabled=true",
            f"rollout.weight_dir={tmp_path}",
        ],
    )
    seen: list = []
    client = make_client("vllm+http://vllm:8000", "policy", Sampling(1.0, 1.0, (3,)))
    client.http = vllm_client.HttpTransport(
        "http://vllm:8000",
        10,
        replay([VLLM["pause"], VLLM["load_lora_adapter"], VLLM["resume"], VLLM["completion"]], seen),
    )
    pool = EnginePool(["vllm+http://vllm:8000"], [], cfg)

    async def scenario() -> None:
        await pool.server_weights.load_adapters([client], "/shared/forge/v000003", 3)
        given = VLLM["completion"]["given"]
        await client.generate(GenerationRequest(given["token_ids"], 4, given["episode_id"]))

    asyncio.run(scenario())
    assert [path for _, path, _ in seen] == ["/pause", "/v1/load_lora_adapter", "/resume", "/v1/completions"]
    assert seen[1][2] == VLLM["load_lora_adapter"]["request"]
    assert seen[3][2]["model"] == "policy-forge-lora"  # requests name the adapter from then on
    assert client.policy_version == 3 and not pool.dead


def test_a_vllm_server_that_refuses_the_adapter_is_dropped_and_the_others_keep_it(tmp_path, capsys):
    from forge.config import load_config
    from forge.rollout.engines.pool import EnginePool

    cfg = load_config(
        "configs/smoke.yaml",
        [
            "rollout.engine=remote",
            "model.lora.enabled=true",
            "rollout.servers=[vllm+http://a:1, vllm+http://b:1]",
            f"rollout.weight_dir={tmp_path}",
        ],
    )
    refused = {**VLLM["error_response"], "method": "POST", "path": "/v1/load_lora_adapter"}
    unload = {**VLLM["unload_lora_adapter"], "status": 404, "response": {"detail": "Not Found"}}
    good, bad = (make_client(f"vllm+http://{host}:1", "policy", Sampling()) for host in "ab")
    good.http = vllm_client.HttpTransport(
        "http://a:1", 10, replay([VLLM["pause"], VLLM["load_lora_adapter"], VLLM["resume"]], [])
    )
    bad.http = vllm_client.HttpTransport(
        "http://b:1", 10, replay([VLLM["pause"], refused, unload, VLLM["resume"]], [])
    )
    pool = EnginePool(["vllm+http://a:1", "vllm+http://b:1"], [], cfg)
    asyncio.run(pool.server_weights.load_adapters([good, bad], "/shared/forge/v000004", 4))
    assert good.policy_version == 4 and good.model == "policy-forge-lora"
    assert bad.policy_version == 0 and bad.model == "policy"  # it keeps naming what it serves
    # The pool knows it by its rollout.servers entry, as a run's sync and its later re-admission do.
    assert list(pool.dead) == ["vllm+http://b:1"] and "LoRA adapter load failed" in capsys.readouterr().err


def test_the_trainers_adapters_are_saved_as_the_peft_folder_vllm_and_forge_serve_load(tmp_path):
    from types import SimpleNamespace

    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from forge.config import TinyModelConfig
    from forge.models.tiny import save_tiny_checkpoint
    from forge.rollout.engines.updates import WeightUpdateError, apply_adapter, trainer_save_adapter

    checkpoint = save_tiny_checkpoint(TinyModelConfig(), tmp_path / "model", seed=0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(checkpoint),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    folder = Path(trainer_save_adapter(SimpleNamespace(model=model), str(tmp_path / "v000001-adapter")))
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["r"] == 4 and sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    saved = load_file(str(folder / "adapter_model.safetensors"))
    trained = {n: t for n, t in model.state_dict().items() if "lora_" in n}
    assert len(saved) == len(trained) > 0
    served = apply_adapter(AutoModelForCausalLM.from_pretrained(checkpoint), folder)
    ids = torch.tensor([[2, 6, 9, 10]])
    assert torch.allclose(served(ids).logits, model(ids).logits, atol=1e-5)
    with pytest.raises(WeightUpdateError, match="lora.enabled"):
        trainer_save_adapter(
            SimpleNamespace(model=AutoModelForCausalLM.from_pretrained(checkpoint)), str(tmp_path / "x")
        )


def test_after_a_lora_sync_a_rollout_workers_vllm_requests_name_the_adapter_with_its_version(tiny_checkpoint):
    import torch

    from forge.config import load_config
    from forge.rollout.engines.router import EngineView
    from forge.rollout.worker import RolloutWorker

    threads = torch.get_num_threads()
    cfg = load_config("configs/smoke.yaml", [f"model.path={tiny_checkpoint}", "model.lora.enabled=true"])
    worker = RolloutWorker(
        str(tiny_checkpoint),
        cfg.model,
        cfg.env,
        cfg.rollout,
        0.5,
        0,
        None,
        cfg.sandbox,
        ["vllm+http://vllm:8000"],
        0,
        None,
    )
    torch.set_num_threads(threads)
    client = worker.router.engines[0].client
    assert client.model == str(tiny_checkpoint)  # version 0: the base model (LoRA's B starts at zero)
    worker.set_engine_view(EngineView(3, adapter=True))
    assert (client.model, client.policy_version) == (f"{tiny_checkpoint}-forge-lora", 3)
    assert (
        vllm_client.completion_call(GenerationRequest([1], 2), client.model, client.sampling).body["model"]
        == f"{tiny_checkpoint}-forge-lora"
    )
