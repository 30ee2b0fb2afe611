"""A long-running gateway: finished episodes recorded to disk in the training form and
dropped from memory, their KV freed at their end, live episodes capped (the least recently
used ended), and a 10,000-call soak whose resident memory levels off."""

from __future__ import annotations

import httpx
import openai
import pytest
from gateway_helpers import calls_of, client

from forge.config import ModelConfig
from forge.gateway import Gateway, GatewayServer
from forge.gateway.recording import read_recorded, standalone_store
from forge.models.loading import load_model, load_tokenizer
from forge.rollout.engines.hf import HFEngine

USER = [{"role": "user", "content": "guess a number"}]


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture
def engine(tiny_checkpoint, tokenizer) -> HFEngine:
    return HFEngine(
        load_model(tiny_checkpoint, ModelConfig()), [tokenizer.eos_token_id], tokenizer.pad_token_id
    )


def serve_store(engine, tokenizer, store) -> GatewayServer:
    return GatewayServer(Gateway(engine, tokenizer, store, max_new_tokens=6, max_context_tokens=256))


def begin(server: GatewayServer) -> dict:
    return httpx.post(f"{server.root_url}/forge/episodes", json={"task": {"task_id": "t"}}).json()


def finish(server: GatewayServer, episode: dict, reward: float = 1.0) -> None:
    httpx.post(f"{server.root_url}/forge/episodes/{episode['episode_id']}/finish", json={"reward": reward})


def test_a_finished_episode_is_recorded_as_its_trajectory_and_one_sample_per_call(
    engine, tokenizer, tmp_path
):
    store = standalone_store(tmp_path)
    with serve_store(engine, tokenizer, store) as server:
        episode = begin(server)
        agent = client(server, episode["episode_id"])
        agent.chat.completions.create(model="p", messages=USER)
        agent.chat.completions.create(model="p", messages=USER, n=2)
        calls = list(calls_of(server, episode))
        finish(server, episode, 0.5)
    [(trajectory, samples)] = read_recorded(tmp_path / "episodes.jsonl")
    assert trajectory.outcome == 0.5 and trajectory.status == "ok" and trajectory.num_turns == 3
    assert [s.token_ids for s in samples] == [c.prompt_ids + c.completion_ids for c in calls]
    assert [s.behaviour_logprobs[len(c.prompt_ids) :] for s, c in zip(samples, calls, strict=True)] == [
        c.logprobs for c in calls
    ]
    assert all(sum(s.loss_mask) == len(c.completion_ids) for s, c in zip(samples, calls, strict=True))


def test_an_episodes_kv_is_freed_when_it_ends(engine, tokenizer, tmp_path):
    with serve_store(engine, tokenizer, standalone_store(tmp_path)) as server:
        episodes = [begin(server) for _ in range(3)]
        for episode in episodes:
            client(server, episode["episode_id"]).chat.completions.create(model="p", messages=USER, n=2)
        cached_while_live = engine.cached_episodes
        for episode in episodes:
            finish(server, episode)
        client(server, begin(server)["episode_id"]).chat.completions.create(model="p", messages=USER)
    assert cached_while_live == 6  # n=2: each choice keeps its own KV until the episode ends
    assert engine.cached_episodes == 1  # only the live episode's


def test_past_the_cap_the_least_recently_used_live_episode_is_ended_and_recorded(engine, tokenizer, tmp_path):
    store = standalone_store(tmp_path, max_live_episodes=2)
    with serve_store(engine, tokenizer, store) as server:
        idle, busy = begin(server), begin(server)
        client(server, busy["episode_id"]).chat.completions.create(model="p", messages=USER)
        newest = begin(server)
        with pytest.raises(openai.ConflictError, match="already finished"):
            client(server, idle["episode_id"]).chat.completions.create(model="p", messages=USER)
        client(server, newest["episode_id"]).chat.completions.create(model="p", messages=USER)
        ended = store.get(idle["episode_id"])
    assert ended.status == "truncated" and "least recently" in ended.error
    assert not store.get(busy["episode_id"]).finished
    [(trajectory, _)] = read_recorded(tmp_path / "episodes.jsonl")
    assert trajectory.info["episode_id"] == idle["episode_id"]


def test_only_the_last_finished_episodes_stay_in_memory(engine, tokenizer, tmp_path):
    store = standalone_store(tmp_path, keep_finished=2)
    with serve_store(engine, tokenizer, store) as server:
        episodes = [begin(server) for _ in range(5)]
        for episode in episodes:
            finish(server, episode)
        gone = httpx.get(f"{server.root_url}/forge/episodes/{episodes[0]['episode_id']}")
        kept = httpx.get(f"{server.root_url}/forge/episodes/{episodes[-1]['episode_id']}")
    assert list(store.episodes) == [e["episode_id"] for e in episodes[-2:]]
    assert gone.status_code == 404 and kept.json()["finished"]
    assert len(read_recorded(tmp_path / "episodes.jsonl")) == 5


def test_a_file_that_is_not_a_recording_says_so(tmp_path):
    path = tmp_path / "episodes.jsonl"
    path.write_text('{"trajectory": {}}\n')
    with pytest.raises(ValueError, match="episodes.jsonl:1 is not a recorded episode"):
        read_recorded(path)


@pytest.mark.slow
def test_resident_memory_levels_off_over_4000_calls(tmp_path):
    # The caps are reached within ~100 episodes; `python -m bench.gateway_soak --calls 10000`
    # is the long form (README).
    from bench.gateway_soak import soak

    result = soak(4_000, every=250, max_live=32, keep_finished=16, workdir=tmp_path)
    print({k: v for k, v in result.items() if k != "series"})
    assert result["calls"] >= 4_000
    # Live (32) and finished (16) episodes; the engine's KV for the live ones, plus at most one
    # just-ended episode per agent whose release waits for the running batch.
    assert result["max_episodes_in_memory"] <= 32 + 16 and result["max_engine_cached_episodes"] <= 32 + 4
    assert result["growth_second_half_mb"] < 20, result["series"]


def test_forge_serve_records_the_episodes_agents_play_through_it(tiny_checkpoint, tmp_path):
    from forge.rollout.engines.server import EngineServer, make_service

    service = make_service(tiny_checkpoint, max_new_tokens=4, max_context_tokens=128, record_dir=tmp_path)
    with EngineServer(service) as running:
        episode = httpx.post(f"{running.url}/forge/episodes", json={"task": {"task_id": "dev"}}).json()
        agent = openai.OpenAI(base_url=f"{running.url}/v1", api_key=episode["episode_id"], max_retries=0)
        reply = agent.chat.completions.create(model="p", messages=USER, logprobs=True)
        httpx.post(f"{running.url}/forge/episodes/{episode['episode_id']}/finish", json={"reward": 1.0})
    [(trajectory, [sample])] = read_recorded(tmp_path / "episodes.jsonl")
    assert trajectory.outcome == 1.0 and trajectory.task_id == "dev"
    generated = [t for t, m in zip(sample.token_ids, sample.loss_mask, strict=True) if m]
    assert len(generated) == reply.usage.completion_tokens
    assert [e.logprob for e in reply.choices[0].logprobs.content] == [
        lp for lp, m in zip(sample.behaviour_logprobs, sample.loss_mask, strict=True) if m]
