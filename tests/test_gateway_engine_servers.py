"""The gateway over engine servers: its OpenAI endpoints route calls to `forge serve`
engines (a `Router` of `ForgeClient`s) and answer the official openai SDK exactly as the
gateway over an in-process engine does: the same tokens for a seed, stop strings cut at the
same token (the server stops there itself), the same logprobs and top alternatives, a
stream of the same text; and every call is recorded with the engine's own sampled ids."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from forge.config import TinyModelConfig, load_config
from forge.gateway import Gateway, GatewayServer
from forge.gateway.episodes import EpisodeStore
from forge.models.tiny import save_tiny_checkpoint
from forge.rollout.chat import ChatFormat
from forge.rollout.engines.protocol import GenerationResult
from forge.rollout.engines.remote import ForgeClient, Sampling
from forge.rollout.engines.router import Router
from forge.rollout.engines.server import EngineServer, make_service
from forge_envs.guess_number import GuessNumberEnv

MESSAGES = [{"role": "user", "content": "guess a number from 0 to 7, then say why"}]
MAX_NEW_TOKENS = 24


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # Qwen2 here: the other gateway and serve tests run the default Llama family.
    return save_tiny_checkpoint(
        TinyModelConfig(architecture="qwen2"), tmp_path_factory.mktemp("qwen2"), seed=3
    )


@pytest.fixture(scope="module")
def engines(checkpoint):
    """Two `forge serve` engines of the checkpoint, each on its own HTTP server."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    servers = [
        EngineServer(
            make_service(checkpoint, max_new_tokens=MAX_NEW_TOKENS, max_context_tokens=512, seed=index)
        ).start()
        for index in range(2)
    ]
    yield servers
    for server in servers:
        server.stop()
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def remote(engines):
    """A gateway whose engine is the two servers, behind a router."""
    service = engines[0].service
    tokenizer = service.gateway.tokenizer
    sampling = Sampling(1.0, 1.0, tuple(ChatFormat(tokenizer).stop_token_ids))
    router = Router(
        [ForgeClient(server.url, sampling=sampling) for server in engines], name="gateway", max_wait_s=0.01
    )
    gateway = Gateway(
        sampling, tokenizer, EpisodeStore(lambda: GuessNumberEnv(n=8)), MAX_NEW_TOKENS, 512, router=router
    )
    with GatewayServer(gateway) as server:
        yield server
        server.call(router.close(), timeout_s=10)


def start(server, group_id: str | None = None) -> tuple[openai.OpenAI, str]:
    """An episode on `server` (a gateway, or a `forge serve`'s own OpenAI endpoints) and a
    client whose API key names it."""
    base = server.root_url if hasattr(server, "root_url") else server.url
    body = {"task": {"secret": 3}} if group_id is None else {"task": {"secret": 3}, "group_id": group_id}
    episode = httpx.post(f"{base}/forge/episodes", json=body, timeout=30).json()["episode_id"]
    return openai.OpenAI(base_url=f"{base}/v1", api_key=episode, max_retries=0, timeout=60), episode


def last_call(server, episode_id: str):
    gateway = server.gateway if hasattr(server, "gateway") else server.service.gateway
    return gateway.store.get(episode_id).calls[-1]


def chat(client: openai.OpenAI, **options):
    return client.chat.completions.create(
        model="policy", messages=MESSAGES, max_tokens=MAX_NEW_TOKENS, **options
    )


def entries(reply) -> list[tuple[str, float, list[tuple[str, float]]]]:
    return [
        (e.token, e.logprob, [(t.token, t.logprob) for t in e.top_logprobs])
        for e in reply.choices[0].logprobs.content
    ]


def assert_same_logprobs(over_servers, in_process) -> None:
    a, b = entries(over_servers), entries(in_process)
    assert [e[0] for e in a] == [e[0] for e in b]
    for (_, logprob_a, top_a), (_, logprob_b, top_b) in zip(a, b, strict=True):
        assert logprob_a == pytest.approx(logprob_b, abs=1e-4)
        assert [t for t, _ in top_a] == [t for t, _ in top_b]
        assert [v for _, v in top_a] == pytest.approx([v for _, v in top_b], abs=1e-4)


@pytest.mark.parametrize("seed", [11, 12])
def test_a_seeded_chat_over_engine_servers_is_the_in_process_gateways_reply_token_for_token(
    remote, engines, seed
):
    client, episode = start(remote)
    local, local_episode = start(engines[0])
    over_servers = chat(client, seed=seed, logprobs=True, top_logprobs=3)
    in_process = chat(local, seed=seed, logprobs=True, top_logprobs=3)
    assert over_servers.choices[0].message.content == in_process.choices[0].message.content
    assert over_servers.choices[0].finish_reason == in_process.choices[0].finish_reason
    assert_same_logprobs(over_servers, in_process)
    assert all(len(e[2]) == 3 for e in entries(over_servers))
    recorded, expected = last_call(remote, episode), last_call(engines[0], local_episode)
    assert recorded.prompt_ids == expected.prompt_ids
    assert (
        recorded.completion_ids == expected.completion_ids
    )  # the engine's sampled ids, not re-tokenized text
    assert recorded.logprobs == pytest.approx(expected.logprobs, abs=1e-4)


def stop_string(text: str) -> str:
    """A piece of a reply's text that first occurs past its start: a stop string that cuts it."""
    for width in (4, 3, 2):
        for begin in range(len(text) // 3, len(text) - width):
            piece = text[begin : begin + width]
            if piece.strip() and text.index(piece) > 0:
                return piece
    pytest.skip(f"the reply {text!r} has no usable stop string")


def test_a_stop_string_ends_the_reply_at_the_token_that_completes_it_and_the_server_stops_there(
    remote, engines
):
    client, _ = start(remote)
    whole = chat(client, seed=21).choices[0].message.content
    stop = stop_string(whole)
    before = [server.service.served.metrics()["generated_tokens"] for server in engines]

    client, episode = start(remote)
    cut = chat(client, seed=21, stop=[stop, "\x00never"], logprobs=True)
    local, local_episode = start(engines[0])
    in_process = chat(local, seed=21, stop=[stop, "\x00never"], logprobs=True)

    assert cut.choices[0].message.content == whole[: whole.index(stop)]
    assert cut.choices[0].message.content == in_process.choices[0].message.content
    assert cut.choices[0].finish_reason == in_process.choices[0].finish_reason == "stop"
    recorded, expected = last_call(remote, episode), last_call(engines[0], local_episode)
    assert recorded.completion_ids == expected.completion_ids and recorded.finished
    tokenizer = engines[0].service.gateway.tokenizer
    assert stop in tokenizer.decode(recorded.completion_ids)  # the stop's own token is the last recorded
    assert stop not in tokenizer.decode(recorded.completion_ids[:-1])
    assert len(cut.choices[0].logprobs.content) == len(recorded.completion_ids)
    generated = sum(server.service.served.metrics()["generated_tokens"] for server in engines) - sum(before)
    # The server stopped at the stop string (the local call added its own tokens on engine 0).
    assert generated == len(recorded.completion_ids) + len(expected.completion_ids)


def test_a_stream_over_engine_servers_sends_the_same_text_and_logprobs_as_the_whole_reply(remote):
    client, _ = start(remote)
    whole = chat(client, seed=31, logprobs=True)
    stop = stop_string(whole.choices[0].message.content)
    client, _ = start(remote)
    reply = chat(client, seed=31, stop=[stop], logprobs=True)
    client, episode = start(remote)
    chunks = list(chat(client, seed=31, stop=[stop], logprobs=True, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    streamed = [
        e.token for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content
    ]
    assert text == reply.choices[0].message.content
    assert streamed == [e.token for e in reply.choices[0].logprobs.content]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert len(last_call(remote, episode).completion_ids) == len(streamed)


def test_n_choices_and_seeds_over_engine_servers_sample_each_choice_with_its_own_seed(remote, engines):
    client, _ = start(remote)
    both = client.chat.completions.create(model="policy", messages=MESSAGES, max_tokens=8, n=2, seed=41)
    again = client.chat.completions.create(model="policy", messages=MESSAGES, max_tokens=8, n=2, seed=41)
    local, _ = start(engines[0])
    in_process = local.chat.completions.create(model="policy", messages=MESSAGES, max_tokens=8, n=2, seed=41)
    texts = [c.message.content for c in both.choices]
    assert (
        texts == [c.message.content for c in again.choices] == [c.message.content for c in in_process.choices]
    )


def test_a_groups_episodes_are_routed_to_one_engine_and_released_when_they_end(remote):
    router = remote.gateway.batching
    episodes = [start(remote, group_id="group-a") for _ in range(3)]
    for client, _ in episodes:
        chat(client, seed=51)
    engines = {router._episode_engine[episode] for _, episode in episodes}
    assert len(engines) == 1
    for _, episode in episodes:
        remote.call(remote.gateway.finish_episode(episode, reward=0.0), timeout_s=30)
    assert not any(episode in router._episode_engine for _, episode in episodes)


class WholeReplies:
    """An engine server that answers every request with one fixed reply, stop strings or
    not (as a server that cannot stop on them would): the gateway must cut it itself."""

    kind, url, policy_version = "test", "http://whole-replies", 4

    def __init__(self, reply: list[int]) -> None:
        self.reply = reply

    async def generate_batch(self, requests, release=None):
        return [
            GenerationResult(list(self.reply), [-0.25 * (i + 1) for i in range(len(self.reply))], False, 4, 1)
            for _ in requests
        ]

    async def release(self, episode_ids):
        pass


def test_tokens_a_server_sampled_past_a_stop_string_are_cut_from_the_reply_and_the_record(engines):
    tokenizer = engines[0].service.gateway.tokenizer
    reply = tokenizer(" higher 2 lower 3 lower", add_special_tokens=False)["input_ids"]
    router = Router([WholeReplies(reply)], name="gateway")
    store = EpisodeStore(lambda: GuessNumberEnv(n=8))
    gateway = Gateway(Sampling(), tokenizer, store, MAX_NEW_TOKENS, 512, router=router)
    with GatewayServer(gateway) as server:
        for stream in (False, True):
            client, episode = start(server)
            answer = chat(client, stop=["lower"], logprobs=True, stream=stream)
            if stream:
                answer = list(answer)
                text = "".join(c.choices[0].delta.content or "" for c in answer if c.choices)
                reason = [c.choices[0].finish_reason for c in answer if c.choices][-1]
            else:
                text, reason = answer.choices[0].message.content, answer.choices[0].finish_reason
            recorded = last_call(server, episode)
            assert text.strip() == "higher 2" and reason == "stop"
            kept = next(n for n in range(1, len(reply) + 1) if "lower" in tokenizer.decode(reply[:n]))
            assert recorded.completion_ids == reply[:kept] and recorded.finished
            assert recorded.logprobs == [-0.25 * (i + 1) for i in range(kept)]
        server.call(router.close(), timeout_s=10)


def test_a_call_whose_client_left_is_cancelled_on_the_engine_server(checkpoint):
    """The gateway gives the call up (its client closed the connection): the router's
    ForgeClient cancels it on the server (POST /forge/cancel), whose engine ends it at the
    next decode step instead of generating to the token limit."""
    limit = 600  # ~3 s of decoding at 5 ms a step, were it run to the end
    service = make_service(checkpoint, max_new_tokens=limit, max_context_tokens=1024)
    engine = service.served.engine
    engine.stop_token_ids = torch.tensor([], dtype=torch.long)  # no stop token: runs to its limit
    engine.model.register_forward_hook(lambda *_: time.sleep(0.005))
    tokenizer = service.gateway.tokenizer
    with EngineServer(service) as engine_server:
        router = Router([ForgeClient(engine_server.url)], name="gateway", max_wait_s=0.01)
        store = EpisodeStore(lambda: GuessNumberEnv(n=8))
        with GatewayServer(Gateway(Sampling(), tokenizer, store, limit, 1024, router=router)) as server:
            client, episode = start(server)
            leaving = client.with_options(timeout=0.8)
            with pytest.raises(openai.APITimeoutError):
                leaving.chat.completions.create(model="policy", messages=MESSAGES, max_tokens=limit)
            deadline = time.monotonic() + 10
            while service.served.metrics()["requests"] < 1 and time.monotonic() < deadline:
                time.sleep(0.02)
            generated = service.served.metrics()["generated_tokens"]
            time.sleep(0.1)  # the call is dropped once its generation ends
            dropped = store.get(episode)
            server.call(router.close(), timeout_s=10)
    assert 0 < generated < limit // 4, generated
    assert dropped.calls == [] and dropped.info["calls_dropped"] == 1


def test_the_forge_client_sends_stop_seed_and_top_logprobs_and_the_request_sampling_first():
    from forge.rollout.engines.protocol import GenerationRequest
    from forge.rollout.engines.remote import forge_generate_call

    request = GenerationRequest([1, 2], 4, "e", temperature=0.5, seed=7, top_logprobs=2, stop=["\n"])
    body = forge_generate_call(request, Sampling(1.0, 0.9)).body
    assert body == {
        "token_ids": [1, 2],
        "max_new_tokens": 4,
        "episode_id": "e",
        "temperature": 0.5,
        "top_p": 0.9,
        "seed": 7,
        "top_logprobs": 2,
        "stop": ["\n"],
    }


AGENT = """
import json, os, zlib
import httpx
from openai import OpenAI

STOPS = {stops!r}
episode = os.environ["FORGE_EPISODE_ID"]
url = os.environ["FORGE_GATEWAY_URL"] + "/forge/episodes/" + episode
client = OpenAI(max_retries=0)
messages = [{{"role": "user", "content": httpx.get(url, timeout=60).json()["observation"]}}]
with open(os.path.join(os.environ["AGENT_LOG_DIR"], episode + ".jsonl"), "w") as log:
    for turn in range(int(os.environ["FORGE_MAX_TURNS"])):
        reply = client.chat.completions.create(model="policy", messages=messages, stop=STOPS, logprobs=True,
                                               top_logprobs=2, seed=zlib.crc32(episode.encode()) + turn)
        choice = reply.choices[0]
        content = choice.logprobs.content if choice.logprobs else []
        log.write(json.dumps({{"text": choice.message.content, "finish": choice.finish_reason,
                              "bytes": [entry.bytes for entry in content],
                              "logprobs": [entry.logprob for entry in content],
                              "tops": [len(entry.top_logprobs) for entry in content],
                              "version": reply.model_dump()["forge"]["policy_version"]}}) + "\\n")
        messages.append({{"role": "assistant", "content": choice.message.content}})
        result = httpx.post(url + "/step", json={{"action": choice.message.content}}, timeout=60).json()
        if result["done"]:
            break
        messages.append({{"role": "user", "content": result["observation"]}})
httpx.post(url + "/finish", json={{}}, timeout=60).raise_for_status()
"""


@pytest.mark.slow
def test_a_gateway_run_on_engine_servers_trains_on_the_tokens_the_engines_sampled(
    ray_session, tmp_path, monkeypatch
):
    """Agent processes on the openai SDK (stop strings, logprobs, top_logprobs, seeds) play
    every episode through a gateway whose engines are two `forge serve` actors; every call
    the agents saw is trained on, with the engine's ids, logprobs and version."""
    import json

    import forge.run.gateway as gateway_run
    from forge.gateway.decoding import token_bytes
    from forge.models.loading import load_tokenizer
    from forge.run.launch import train

    stops = [" tool", " system", "3"]
    (tmp_path / "agent.py").write_text(AGENT.format(stops=stops))
    logs = tmp_path / "agents"
    logs.mkdir()
    monkeypatch.setenv("AGENT_LOG_DIR", str(logs))
    trained: list = []
    original = gateway_run.episode_samples

    def capture(episodes, advantages):
        samples = original(episodes, advantages)
        trained.extend(samples)
        return samples

    monkeypatch.setattr(gateway_run, "episode_samples", capture)

    cfg = load_config(
        "configs/gateway-smoke.yaml",
        [
            "rollout.engine=server",
            "rollout.num_engines=2",
            "rollout.num_cpus_per_engine=1",
            "train.max_steps=2",
            # 2 groups of 2: one per engine. Each agent process costs ~1 s of CPU to start; a
            # call ends on a stop string ~40% of the time (23 of 56 calls), so ~28 calls have some.
            "rollout.group_size=2",
            "rollout.max_new_tokens=8",
            "train.skip_zero_advantage=false",
            "train.max_steps_without_signal=0",  # two steps may score alike: not what this tests
            "gateway.max_concurrent_agents=8",
            f"gateway.agent_command='{{python}} {tmp_path / 'agent.py'}'",
        ],
    )
    result = train(cfg, tmp_path / "run", progress=False)

    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert result.steps == 2 and [row["policy_version"] for row in rows] == [1.0, 2.0]
    assert all(row["agents_failed"] == 0 and row["episodes"] == 4 for row in rows)
    assert all(row["trained_samples"] == row["gateway_calls"] > 0 for row in rows)
    assert all(row["prefix_cache_hit_rate"] > 0 for row in rows)  # later turns extend cached episodes

    calls = [json.loads(line) for log in logs.iterdir() for line in log.read_text().splitlines()]
    seen = sorted(
        (tuple(map(tuple, c["bytes"])), tuple(round(v, 5) for v in c["logprobs"]), c["version"])
        for c in calls
        if c["bytes"]
    )
    tokenizer = load_tokenizer(result.checkpoint)
    used = []
    for sample in trained:
        completion = [i for i, m in enumerate(sample.loss_mask) if m]
        ids = [sample.token_ids[i] for i in completion]
        versions = {sample.policy_versions[i] for i in completion}
        assert len(versions) == 1
        used.append(
            (
                tuple(tuple(token_bytes(tokenizer, t)) for t in ids),
                tuple(round(sample.behaviour_logprobs[i], 5) for i in completion),
                versions.pop(),
            )
        )
    assert sorted(used) == seen  # what each agent was shown is exactly what was trained, call for call
    assert all(all(n == 2 for n in c["tops"]) for c in calls)
    assert not any(stop in (c["text"] or "") for c in calls for stop in stops)
    cut = [
        c
        for c in calls
        if c["finish"] == "stop"
        and any(s in bytes(sum(c["bytes"], [])).decode("utf-8", "replace") for s in stops)
    ]
    assert cut  # some replies ended on a stop string (its token recorded and trained, its text not shown)


def test_a_call_whose_engine_server_is_gone_loses_its_episode_not_errors_it(engines):
    """The engine went away with the episode's context: the agent hears 503 and the episode
    is lost (never trained on, not counted against the agent or its env), as on a rollout
    worker; the engine is dropped from the router."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{probe.getsockname()[1]}"
    tokenizer = engines[0].service.gateway.tokenizer
    sampling = Sampling(1.0, 1.0, tuple(ChatFormat(tokenizer).stop_token_ids))
    router = Router([ForgeClient(gone, sampling=sampling)], name="gateway", max_wait_s=0.01)
    gateway = Gateway(
        sampling, tokenizer, EpisodeStore(lambda: GuessNumberEnv(n=8)), MAX_NEW_TOKENS, 512, router=router
    )
    with GatewayServer(gateway) as server:
        client, episode = start(server)
        with pytest.raises(openai.APIStatusError) as failed:
            chat(client)
        server.call(router.close(), timeout_s=10)
    assert failed.value.status_code == 503 and "is lost" in failed.value.message
    assert gateway.store.get(episode).status == "lost"
    assert gateway.store.get(episode).to_trajectory(0.5).status == "lost"
    assert router.alive == []
