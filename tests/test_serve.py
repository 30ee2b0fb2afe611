"""`forge serve`: the token API, prefix caching, weight updates and pause/resume, and the
OpenAI endpoints it serves through the training gateway's own app, over real HTTP."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from forge.config import ConfigError, TinyModelConfig
from forge.models.tiny import save_tiny_checkpoint
from forge.rollout.engines.protocol import GenerationRequest, GenerationResult
from forge.rollout.engines.remote import EngineLost, ForgeClient
from forge.rollout.engines.server import EngineServer, make_service
from forge.rollout.engines.updates import tensors_to_bytes

ROOT = Path(__file__).resolve().parents[1]

# A weight load reads a checkpoint and swaps the engine's weights: on a loaded CI machine that
# took over httpx's 5 s default once, which is not what these tests check.
WEIGHTS_TIMEOUT_S = 60


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(TinyModelConfig(), tmp_path_factory.mktemp("serve_model"), seed=0)


@pytest.fixture(scope="module")
def other_checkpoint(tmp_path_factory) -> Path:
    """Same architecture, other weights: a 'new version' to load."""
    return save_tiny_checkpoint(TinyModelConfig(), tmp_path_factory.mktemp("serve_model_v2"), seed=1)


@pytest.fixture()
def server(checkpoint):
    service = make_service(checkpoint, max_new_tokens=6, max_context_tokens=128, cache_tokens=64)
    with EngineServer(service) as running:
        yield running


def prompt(server: EngineServer, text: str = "guess a number from 0 to 3") -> list[int]:
    return server.service.gateway.encode(text)


def test_generate_returns_sampled_ids_their_logprobs_finish_reason_and_version(server):
    ids = prompt(server)
    body = httpx.post(f"{server.url}/forge/generate", json={"token_ids": ids, "max_new_tokens": 4}).json()
    assert len(body["token_ids"]) == len(body["logprobs"]) >= 1
    assert body["finish_reason"] in ("stop", "length") and body["policy_version"] == 0
    # The first token's behaviour logprob is the policy's own at that context (exactness).
    expected = server.service.served.next_token_logprobs(ids)[body["token_ids"][0]].item()
    assert body["logprobs"][0] == pytest.approx(expected, abs=1e-5)


def test_a_turn_that_extends_the_cached_episode_prefills_only_its_new_tokens(server):
    ids = prompt(server)
    first = httpx.post(
        f"{server.url}/forge/generate", json={"token_ids": ids, "max_new_tokens": 3, "episode_id": "ep"}
    ).json()
    observation = prompt(server, "higher")
    context = ids + first["token_ids"] + observation
    second = httpx.post(
        f"{server.url}/forge/generate", json={"token_ids": context, "max_new_tokens": 3, "episode_id": "ep"}
    ).json()
    # Everything up to the last token fed back during decoding was cached.
    assert second["cached_tokens"] >= len(ids) + len(first["token_ids"]) - 1
    assert second["prefill_tokens"] <= len(observation) + 1
    metrics = httpx.get(f"{server.url}/forge/metrics").json()
    assert metrics["prefix_cache_hit_tokens"] == second["cached_tokens"]
    assert 0 < metrics["prefix_cache_hit_rate"] < 1 and metrics["prefix_cache_episodes"] == 1


def test_the_prefix_cache_is_bounded_and_evicts_the_least_recently_used_episode(server):
    ids = prompt(server)  # 64-token budget: three 24+-token episodes cannot all stay
    for name in ("a", "b", "c"):
        httpx.post(
            f"{server.url}/forge/generate",
            json={"token_ids": ids * 3, "max_new_tokens": 2, "episode_id": name},
        )
    metrics = httpx.get(f"{server.url}/forge/metrics").json()
    assert metrics["prefix_cache_tokens"] <= metrics["prefix_cache_capacity_tokens"] == 64
    assert metrics["prefix_cache_evictions"] >= 1
    assert "a" not in server.service.served._live and "c" in server.service.served._live


def test_a_checkpoint_folder_update_stamps_its_version_on_later_outputs(server, other_checkpoint):
    ids = prompt(server)
    before = server.service.served.next_token_logprobs(ids)
    reply = httpx.post(
        f"{server.url}/forge/weights",
        json={"checkpoint": str(other_checkpoint), "version": 5},
        timeout=WEIGHTS_TIMEOUT_S,
    )
    assert reply.status_code == 200 and reply.json()["policy_version"] == 5
    after = server.service.served.next_token_logprobs(ids)
    assert not torch.allclose(before, after)
    body = httpx.post(f"{server.url}/forge/generate", json={"token_ids": ids}).json()
    assert body["policy_version"] == 5 and httpx.get(f"{server.url}/ready").json()["policy_version"] == 5


def test_pushed_tensors_update_the_weights(server, other_checkpoint):
    from forge.rollout.engines.updates import checkpoint_state

    state = checkpoint_state(other_checkpoint)
    reply = httpx.post(
        f"{server.url}/forge/weights/tensors",
        params={"version": 2},
        content=tensors_to_bytes(state),
        timeout=WEIGHTS_TIMEOUT_S,
    )
    assert reply.json()["policy_version"] == 2
    model_state = server.service.served.engine.model.state_dict()
    name = next(iter(state))
    assert torch.equal(model_state[name], state[name])


def test_a_lora_adapter_folder_is_applied_and_versioned(server, checkpoint, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(checkpoint),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    model.save_pretrained(tmp_path / "adapter")
    ids = prompt(server)
    before = server.service.served.next_token_logprobs(ids)
    reply = httpx.post(
        f"{server.url}/forge/weights",
        json={"adapter": str(tmp_path / "adapter"), "version": 9},
        timeout=WEIGHTS_TIMEOUT_S,
    )
    assert reply.status_code == 200, reply.text
    assert not torch.allclose(before, server.service.served.next_token_logprobs(ids))
    assert httpx.post(f"{server.url}/forge/generate", json={"token_ids": ids}).json()["policy_version"] == 9


def test_generation_waits_while_paused_and_goes_on_after_resume(server):
    assert httpx.post(f"{server.url}/forge/pause").json() == {"paused": True}
    assert httpx.get(f"{server.url}/ready").status_code == 503
    done = threading.Event()

    def call() -> None:
        httpx.post(f"{server.url}/forge/generate", json={"token_ids": prompt(server)}, timeout=30)
        done.set()

    threading.Thread(target=call, daemon=True).start()
    assert not done.wait(0.5)  # held while paused
    httpx.post(f"{server.url}/forge/resume")
    assert done.wait(10)


def test_bad_requests_get_a_clear_400(server, tmp_path):
    url = server.url
    out_of_vocab = httpx.post(f"{url}/forge/generate", json={"token_ids": [10**6]})
    assert out_of_vocab.status_code == 400 and "outside the vocabulary" in out_of_vocab.text
    too_long = httpx.post(f"{url}/forge/generate", json={"token_ids": [5] * 200})
    assert too_long.status_code == 400 and "context limit" in too_long.text
    over_cap = httpx.post(f"{url}/forge/generate", json={"token_ids": [5], "max_new_tokens": 99})
    assert over_cap.status_code == 400 and "--max-new-tokens" in over_cap.text
    missing = httpx.post(
        f"{url}/forge/weights",
        json={"checkpoint": str(tmp_path / "nope"), "version": 1},
        timeout=WEIGHTS_TIMEOUT_S,
    )
    assert missing.status_code == 400 and "does not exist" in missing.text
    not_adapter = httpx.post(
        f"{url}/forge/weights", json={"adapter": str(tmp_path), "version": 1}, timeout=WEIGHTS_TIMEOUT_S
    )
    assert not_adapter.status_code == 400 and "adapter_config.json" in not_adapter.text
    garbage = httpx.post(
        f"{url}/forge/weights/tensors",
        params={"version": 1},
        content=b"not safetensors",
        timeout=WEIGHTS_TIMEOUT_S,
    )
    assert garbage.status_code == 400 and "safetensors" in garbage.text


def test_openai_chat_is_served_by_the_gateway_app_with_the_engine_version(server, other_checkpoint):
    httpx.post(
        f"{server.url}/forge/weights",
        json={"checkpoint": str(other_checkpoint), "version": 3},
        timeout=WEIGHTS_TIMEOUT_S,
    )
    episode = httpx.post(f"{server.url}/forge/episodes", json={"task": {}}).json()
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=episode["episode_id"])
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3
    )
    assert reply.model_extra["forge"]["policy_version"] == 3
    assert [m.id for m in client.models.list().data] == [server.service.model_name]


def test_a_batch_call_runs_its_requests_as_one_engine_batch_each_answered_as_alone(server):
    ids = prompt(server)
    before = server.service.served.metrics()["batches"]
    body = httpx.post(
        f"{server.url}/forge/generate/batch",
        json={
            "requests": [
                {"token_ids": ids, "max_new_tokens": 1, "episode_id": f"e{i}", "temperature": 0}
                for i in range(4)
            ]
        },
    ).json()
    assert server.service.served.metrics()["batches"] == before + 1
    alone = httpx.post(
        f"{server.url}/forge/generate", json={"token_ids": ids, "max_new_tokens": 1, "temperature": 0}
    )
    assert [r["token_ids"] for r in body["results"]] == [alone.json()["token_ids"]] * 4
    assert [r["logprobs"][0] for r in body["results"]] == pytest.approx(
        [alone.json()["logprobs"][0]] * 4, abs=1e-5
    )
    assert {r["policy_version"] for r in body["results"]} == {0}


def test_a_refused_request_in_a_batch_gets_its_own_error_and_the_others_are_answered(server):
    ids = prompt(server)
    body = httpx.post(
        f"{server.url}/forge/generate/batch",
        json={
            "requests": [
                {"token_ids": ids, "max_new_tokens": 2},
                {"token_ids": [10**6]},
                {"token_ids": [5] * 200},
            ]
        },
    ).json()
    good, out_of_vocab, too_long = body["results"]
    assert len(good["token_ids"]) >= 1
    assert out_of_vocab["status"] == 400 and "outside the vocabulary" in out_of_vocab["error"]
    assert "context limit" in too_long["error"]


def test_a_batch_ends_the_episodes_it_names_before_generating_and_a_new_one_starts_from_their_kv(server):
    served = server.service.served
    ids = prompt(server) * 3  # past BORROW_MIN_TOKENS
    httpx.post(
        f"{server.url}/forge/generate", json={"token_ids": ids, "max_new_tokens": 1, "episode_id": "old"}
    )
    assert "old" in served._live and not served._ended
    answer = httpx.post(
        f"{server.url}/forge/generate/batch",
        json={"requests": [{"token_ids": ids, "max_new_tokens": 1, "episode_id": "new"}], "release": ["old"]},
    ).json()["results"][0]
    assert list(served._ended) == ["old"] and "new" in served._live
    assert answer["prefill_tokens"] == 1 and answer["cached_tokens"] == len(ids) - 1  # from old's KV
    metrics = httpx.get(f"{server.url}/forge/metrics").json()
    assert metrics["prefix_cache_episodes"] == 1 and metrics["prefix_cache_ended_episodes"] == 1
    assert httpx.post(f"{server.url}/forge/release", json={}).status_code == 400


def test_an_ended_episode_kv_is_dropped_first_when_the_cache_needs_its_room_and_by_new_weights(checkpoint):
    served = make_service(checkpoint, max_new_tokens=6, max_context_tokens=128, cache_tokens=90).served
    engine = served.engine
    ids = list(range(3, 27))  # 24 tokens

    def turn(name: str, tokens: list[int]) -> GenerationResult:
        return served.generate([GenerationRequest(tokens, 2, name)])[0]

    turn("live", [50] * 24)
    turn("a", ids)
    served.release("a")
    assert engine.retired_episodes == 1 and served.metrics()["prefix_cache_ended_episodes"] == 1
    assert turn("b", ids + [30]).prefill_tokens == 1  # a's KV, all of the prompt it shares
    turn("c", [40] * 24)  # past 90 tokens: a goes, though "live" was used longer ago
    assert engine.retired_episodes == 0 and not served._ended and list(served._live) == ["live", "b", "c"]
    served.release("b")
    served.load_weights({}, 1)
    assert engine.retired_episodes == 0 and served.metrics()["prefix_cache_tokens"] == 0


def test_the_forge_client_sends_a_batch_and_reads_each_answer_or_error(server):
    from forge.rollout.engines.remote import ProtocolError

    async def scenario() -> None:
        client = ForgeClient(server.url, timeout_s=30)
        results = await client.generate_batch(
            [GenerationRequest(prompt(server), 2, "a"), GenerationRequest([10**6], 2, "b")], release=["gone"]
        )
        assert len(results[0].token_ids) == len(results[0].logprobs) >= 1
        assert isinstance(results[1], ProtocolError) and "outside the vocabulary" in str(results[1])
        await client.close()

    asyncio.run(scenario())


def test_the_forge_client_generates_releases_and_updates(server, other_checkpoint):
    async def scenario() -> None:
        client = ForgeClient(server.url, timeout_s=30)
        result = await client.generate(GenerationRequest(prompt(server), 3, "e"))
        assert len(result.token_ids) == len(result.logprobs) and client.policy_version == 0
        await client.release(["e"])
        assert list(server.service.served._ended) == ["e"]  # ended: its KV kept only for later episodes
        await client.load_checkpoint(str(other_checkpoint), 4)
        assert (await client.generate(GenerationRequest(prompt(server), 2))).policy_version == 4
        assert (await client.metrics())["weight_updates"] == 1
        await client.close()

    asyncio.run(scenario())


def test_a_dead_server_raises_engine_lost():
    async def scenario() -> None:
        client = ForgeClient("http://127.0.0.1:9", timeout_s=2)  # nothing listens on the discard port
        with pytest.raises(EngineLost, match="127.0.0.1:9"):
            await client.generate(GenerationRequest([5, 6], 2))
        assert not await client.healthy()

    asyncio.run(scenario())


@pytest.mark.slow
def test_forge_serve_command_serves_a_checkpoint(checkpoint):
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "forge.cli",
            "serve",
            str(checkpoint),
            "--port",
            str(port),
            "--max-new-tokens",
            "4",
            "--attn-implementation",
            "eager",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert process.poll() is None and time.monotonic() < deadline, process.stdout.read()
            time.sleep(0.5)
        body = httpx.post(f"http://127.0.0.1:{port}/forge/generate", json={"token_ids": [2, 6, 9]}).json()
        assert 1 <= len(body["token_ids"]) <= 4
        info = json.loads(httpx.get(f"http://127.0.0.1:{port}/forge/info").text)
        assert (info["max_new_tokens"], info["attn_implementation"]) == (4, "eager")
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_serve_loads_with_the_attention_its_flag_names(checkpoint):
    from forge.rollout.engines.shared_prefix import loaded_attention

    assert (
        loaded_attention(make_service(checkpoint, attn_implementation="eager").served.engine.model.config)
        == "eager"
    )
    assert loaded_attention(make_service(checkpoint).served.engine.model.config) == "sdpa"  # auto


def test_forge_serve_refuses_an_attention_the_family_lacks_naming_the_flag(tmp_path, capsys):
    from forge.cli import main
    from forge.models.families import FAMILIES
    from forge.models.tiny import build_tokenizer

    FAMILIES["gemma2"].build("eager").save_pretrained(tmp_path)
    build_tokenizer().save_pretrained(tmp_path)
    assert main(["serve", str(tmp_path), "--attn-implementation", "sdpa", "--device", "cpu"]) == 2
    error = capsys.readouterr().err
    assert "Gemma2ForCausalLM has no sdpa attention" in error
    assert "set --attn-implementation to auto or one of:" in error
    assert "Traceback" not in error


def test_forge_serve_lists_the_attention_choices(capsys):
    from forge.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "somewhere", "--attn-implementation", "flash"])
    assert "choose from 'auto', 'sdpa', 'eager', 'flex_attention'" in capsys.readouterr().err


def test_a_request_samples_with_its_own_temperature_and_its_logprobs_are_of_it(server):
    ids = prompt(server)
    body = httpx.post(
        f"{server.url}/forge/generate",
        json={"token_ids": ids, "max_new_tokens": 1, "temperature": 0.5, "top_p": 1.0},
    ).json()
    with torch.no_grad():
        logits = server.service.served.engine.model(input_ids=torch.tensor([ids])).logits[0, -1]
    expected = torch.log_softmax(logits.float() / 0.5, dim=-1)[body["token_ids"][0]].item()
    assert body["logprobs"][0] == pytest.approx(expected, abs=1e-5)


def test_the_forge_client_sends_the_runs_sampling():
    from forge.rollout.engines.remote import Sampling, forge_generate_batch_call, forge_generate_call

    call = forge_generate_call(GenerationRequest([1, 2], 3, "e"), Sampling(0.7, 0.9, (3,)))
    assert call.body == {
        "token_ids": [1, 2],
        "max_new_tokens": 3,
        "episode_id": "e",
        "temperature": 0.7,
        "top_p": 0.9,
    }
    assert "temperature" not in forge_generate_call(GenerationRequest([1, 2], 3)).body
    batch = forge_generate_batch_call(
        [GenerationRequest([1, 2], 3, "e")], Sampling(0.7, 0.9, (3,)), release=["d"]
    )
    assert (batch.method, batch.path) == ("POST", "/forge/generate/batch")
    assert batch.body == {"requests": [call.body], "release": ["d"]}


def test_with_an_api_key_every_route_but_health_wants_it_and_forges_client_sends_it(checkpoint, monkeypatch):
    from forge.rollout.engines.server import api_key_from_env
    from forge.rollout.engines.server_keys import ServerKeys

    monkeypatch.setenv("FORGE_TEST_SERVE_KEY", "sk-serve-key")
    service = make_service(checkpoint, max_new_tokens=2, max_context_tokens=128)
    with EngineServer(service, api_key=api_key_from_env("FORGE_TEST_SERVE_KEY")) as running:
        ids = running.service.gateway.encode("hi")
        assert httpx.get(f"{running.url}/health").status_code == 200
        for path in ("/forge/info", "/v1/models", "/ready"):
            assert httpx.get(f"{running.url}{path}").status_code == 401
        wrong = {"Authorization": "Bearer sk-other"}
        assert (
            httpx.post(f"{running.url}/forge/generate", json={"token_ids": ids}, headers=wrong).status_code
            == 401
        )

        async def generate():
            client = ForgeClient(running.url, 30.0, keys=ServerKeys("FORGE_TEST_SERVE_KEY"))
            try:
                return await client.generate(GenerationRequest(ids, 2))
            finally:
                await client.close()

        assert asyncio.run(generate()).token_ids
    monkeypatch.delenv("FORGE_TEST_SERVE_KEY")
    with pytest.raises(
        ConfigError, match="--api-key-env FORGE_TEST_SERVE_KEY: FORGE_TEST_SERVE_KEY is not set"
    ):
        api_key_from_env("FORGE_TEST_SERVE_KEY")
