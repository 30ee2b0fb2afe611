"""The gateway driven by the real `openai` client over loopback: what agents see, and what
the gateway records for training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from gateway_helpers import ScriptedEngine, client, serve, start

from forge.config import ModelConfig, TinyModelConfig
from forge.env.base import StepResult
from forge.env.tools import hermes_tools_prompt
from forge.models.loading import load_model, load_tokenizer
from forge.models.tiny import save_tiny_checkpoint
from forge.rollout.engines.hf import HFEngine
from forge_envs.guess_number import GuessNumberEnv

ROOT = Path(__file__).resolve().parents[1]
TOOL_TEXT = '<tool_call>{"name":"guess","arguments":{"number":3}}</tool_call>'
GUESS_TOOL = {
    "type": "function",
    "function": {
        "name": "guess",
        "description": "Guess the number.",
        "parameters": {"type": "object", "properties": {"number": {"type": "integer"}}},
    },
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return save_tiny_checkpoint(TinyModelConfig(), tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    tokenizer.add_tokens([TOOL_TEXT])  # lets a scripted engine "write" a tool call
    return tokenizer


@pytest.fixture(scope="module")
def engine(checkpoint, tokenizer) -> HFEngine:
    return HFEngine(load_model(checkpoint, ModelConfig()), [tokenizer.eos_token_id], tokenizer.pad_token_id)


def test_chat_call_is_recorded_with_the_template_prompt_and_the_sampled_ids(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        messages = [{"role": "user", "content": episode["observation"]}]
        reply = client(server, episode["episode_id"]).chat.completions.create(model="p", messages=messages)
        [call] = server.gateway.store.get(episode["episode_id"]).calls
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert call.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert reply.choices[0].message.content == tokenizer.decode(call.completion_ids, skip_special_tokens=True)
    assert len(call.logprobs) == len(call.completion_ids) == reply.usage.completion_tokens
    assert all(lp <= 0 for lp in call.logprobs)
    assert call.policy_version == 0


def test_asked_for_logprobs_the_reply_carries_the_behaviour_logprobs(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=[{"role": "user", "content": "guess"}], logprobs=True
        )
        [call] = server.gateway.store.get(episode["episode_id"]).calls
    assert [entry.logprob for entry in reply.choices[0].logprobs.content] == call.logprobs


def test_a_hermes_tool_call_comes_back_as_openai_tool_calls(tokenizer):
    engine = ScriptedEngine([tokenizer.convert_tokens_to_ids(TOOL_TEXT), tokenizer.eos_token_id])
    with serve(engine, tokenizer) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=[{"role": "user", "content": "guess"}], tools=[GUESS_TOOL]
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "guess" and json.loads(call.function.arguments) == {"number": 3}


def tool_call_then_tool_result(tokenizer):
    """The recorded calls of an agent that gets a tool call, then answers it with "higher"."""
    engine = ScriptedEngine([tokenizer.convert_tokens_to_ids(TOOL_TEXT), tokenizer.eos_token_id])
    with serve(engine, tokenizer) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        messages = [{"role": "user", "content": "guess"}]
        first = (
            agent.chat.completions.create(model="p", messages=messages, tools=[GUESS_TOOL]).choices[0].message
        )
        messages += [
            first.model_dump(exclude_none=True),
            {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "higher"},
        ]
        agent.chat.completions.create(model="p", messages=messages, tools=[GUESS_TOOL])
        return server.gateway.store.get(episode["episode_id"]).calls


def test_tool_results_are_rendered_into_the_next_prompt(tokenizer):
    first_call, second_call = tool_call_then_tool_result(tokenizer)
    # A template that ignores tools= gets them, and the calls, as Hermes text.
    expected = [
        {"role": "system", "content": hermes_tools_prompt([GUESS_TOOL])},
        {"role": "user", "content": "guess"},
        {
            "role": "assistant",
            "content": '<tool_call>{"name": "guess", "arguments": {"number": 3}}</tool_call>',
        },
        {"role": "tool", "content": "<tool_response>\nhigher\n</tool_response>"},
    ]
    rendered = tokenizer.apply_chat_template(expected, add_generation_prompt=True, tokenize=False)
    assert second_call.prompt_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert len(second_call.prompt_ids) > len(first_call.prompt_ids)


TOOL_AWARE_TEMPLATE = (
    "{% if tools %}<|im_start|>system {% for t in tools %}{{ t.function.name }} {% endfor %}<|im_end|>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}"
    "{% for c in m.tool_calls or [] %} {{ c.function.name }} {{ c.function.arguments.number }}{% endfor %}"
    "<|im_end|>{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def test_a_template_that_renders_tools_gets_structured_tool_calls(checkpoint):
    tokenizer = load_tokenizer(checkpoint)
    tokenizer.add_tokens([TOOL_TEXT])
    tokenizer.chat_template = TOOL_AWARE_TEMPLATE
    _, second_call = tool_call_then_tool_result(tokenizer)
    # Special tokens decode without spaces around them: set them apart to compare words.
    decoded = re.sub(r"(<\|im_\w+\|>)", r" \1 ", tokenizer.decode(second_call.prompt_ids))
    assert (
        decoded.split()
        == (
            "<|im_start|> system guess <|im_end|> <|im_start|> user guess <|im_end|> "
            "<|im_start|> assistant guess 3 <|im_end|> <|im_start|> tool higher <|im_end|> <|im_start|> assistant"
        ).split()
    )


def test_streamed_chunks_add_up_to_the_recorded_reply(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        stream = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=[{"role": "user", "content": "guess"}], stream=True
        )
        chunks = list(stream)
        [call] = server.gateway.store.get(episode["episode_id"]).calls
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == tokenizer.decode(call.completion_ids, skip_special_tokens=True)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_a_streamed_tool_call_arrives_whole(tokenizer):
    engine = ScriptedEngine([tokenizer.convert_tokens_to_ids(TOOL_TEXT), tokenizer.eos_token_id])
    with serve(engine, tokenizer) as server:
        episode = start(server)
        chunks = list(
            client(server, episode["episode_id"]).chat.completions.create(
                model="p", messages=[{"role": "user", "content": "guess"}], tools=[GUESS_TOOL], stream=True
            )
        )
    [delta] = [c.choices[0].delta.tool_calls for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert delta[0].function.name == "guess" and json.loads(delta[0].function.arguments) == {"number": 3}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def byte_pieces(tokenizer, data: bytes) -> list[int]:
    return tokenizer.convert_tokens_to_ids([f"<0x{byte:02X}>" for byte in data])


def streamed_and_whole(tokenizer, reply: list[int]) -> tuple[list[str], str]:
    """The content pieces a streamed call of `reply` sends, and the same reply's content unstreamed."""
    engine = ScriptedEngine(reply + [tokenizer.eos_token_id])
    with serve(engine, tokenizer, max_new_tokens=len(reply) + 1) as server:
        agent = client(server, start(server)["episode_id"])
        messages = [{"role": "user", "content": "guess"}]
        chunks = list(agent.chat.completions.create(model="p", messages=messages, stream=True))
        whole = agent.chat.completions.create(model="p", messages=messages).choices[0].message.content
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content], whole


def test_byte_pieces_that_spell_no_character_stream_as_they_are_sampled(tokenizer):
    # Byte fallback decodes such a run as all U+FFFD: text ending in U+FFFD is not always a
    # character still arriving, and waiting for one kept the stream silent to the end.
    pieces, whole = streamed_and_whole(tokenizer, byte_pieces(tokenizer, b"\xff\xfe\x80\xc0" * 5))
    assert len(pieces) == 20 and "".join(pieces) == whole == "\ufffd" * 20


def test_a_character_split_over_byte_pieces_is_sent_whole_as_soon_as_complete(tokenizer):
    pieces, whole = streamed_and_whole(tokenizer, byte_pieces(tokenizer, "é日é🙂".encode()))
    assert pieces == ["é", "日", "é", "🙂"] and whole == "é日é🙂"


def test_invalid_bytes_before_characters_and_words_are_sent_at_once(tokenizer):
    words = tokenizer.convert_tokens_to_ids(["\u2581guess", "\u2581a", "\u2581number"])
    # \xc3 then "A": the character \xc3 began can no longer complete.
    pieces, whole = streamed_and_whole(tokenizer, byte_pieces(tokenizer, b"\xff\xc3A\xc3\xa9") + words)
    assert pieces == ["\ufffd", "\ufffdA", "é", " guess", " a", " number"]
    assert "".join(pieces) == whole == "\ufffd\ufffdAé guess a number"


def test_completions_and_models_endpoints(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        completion = agent.completions.create(model="p", prompt="guess a number", max_tokens=3)
        models = agent.models.list()
        [call] = server.gateway.store.get(episode["episode_id"]).calls
    assert call.prompt_ids == tokenizer("guess a number", add_special_tokens=False)["input_ids"]
    assert len(call.completion_ids) <= 3
    assert completion.choices[0].text == tokenizer.decode(call.completion_ids, skip_special_tokens=True)
    assert [m.id for m in models.data] == ["forge-policy"]


def test_the_episode_header_and_user_field_also_name_the_episode(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        by_header, by_user = start(server), start(server)
        anonymous = openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "guess"}]
        anonymous.chat.completions.create(
            model="p", messages=messages, extra_headers={"X-Forge-Episode": by_header["episode_id"]}
        )
        anonymous.chat.completions.create(model="p", messages=messages, user=by_user["episode_id"])
        store = server.gateway.store
        assert (
            len(store.get(by_header["episode_id"]).calls) == len(store.get(by_user["episode_id"]).calls) == 1
        )


def test_starting_an_episode_without_a_task_needs_a_task_source(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        refused = httpx.post(f"{server.root_url}/forge/episodes", json={})
        server.gateway.next_task = lambda: {"task_id": "next", "secret": 1, "n": 8}
        started = httpx.post(f"{server.root_url}/forge/episodes", json={}).json()
    assert refused.status_code == 400 and "send the task" in error_of(refused)
    assert started["task"]["task_id"] == "next" and started["group_id"] == "next"


def test_finish_with_a_reward_sets_the_outcome(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        finished = httpx.post(
            f"{server.root_url}/forge/episodes/{episode['episode_id']}/finish", json={"reward": 0.25}
        ).json()
    assert finished["finished"] and finished["status"] == "ok" and finished["outcome"] == 0.25


def test_finish_with_an_answer_lets_the_env_verify_it(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        right, wrong = start(server, secret=3), start(server, secret=3)
        url = f"{server.root_url}/forge/episodes"
        right_end = httpx.post(f"{url}/{right['episode_id']}/finish", json={"answer": "3"}).json()
        wrong_end = httpx.post(f"{url}/{wrong['episode_id']}/finish", json={"answer": "5"}).json()
    assert right_end["outcome"] == 1.0 and right_end["status"] == "ok"
    assert wrong_end["outcome"] == 0.0 and wrong_end["status"] == "truncated"


def test_env_steps_reach_the_env_and_its_reward_is_the_outcome(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server, secret=3)
        url = f"{server.root_url}/forge/episodes/{episode['episode_id']}"
        hint = httpx.post(f"{url}/step", json={"action": "1"}).json()
        correct = httpx.post(f"{url}/step", json={"action": "3"}).json()
        finished = httpx.post(f"{url}/finish", json={}).json()
    assert hint["observation"] == "higher" and not hint["done"]
    assert correct["done"] and correct["reward"] == 1.0
    assert finished["outcome"] == 1.0


class NumpyGuessEnv(GuessNumberEnv):
    """Scores with numpy, as gym-style envs do."""

    def step(self, action):
        import numpy

        result = super().step(action)
        return StepResult(
            result.observation, numpy.float32(result.reward), numpy.bool_(result.done), result.info
        )


def test_an_envs_numpy_reward_and_done_reach_the_agent_as_json(engine, tokenizer):
    # FastAPI cannot encode numpy's float32 or int64: the step answered 500 after the env had stepped.
    with serve(engine, tokenizer, env_factory=lambda: NumpyGuessEnv(n=8)) as server:
        episode = start(server, secret=3)
        url = f"{server.root_url}/forge/episodes/{episode['episode_id']}"
        correct = httpx.post(f"{url}/step", json={"action": "3"})
    assert correct.status_code == 200, correct.text
    assert correct.json()["reward"] == 1.0 and correct.json()["done"] is True


def test_concurrent_episodes_keep_their_calls_apart(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episodes = [start(server, task_id=f"t{i}") for i in range(4)]
        errors = []

        def play(index: int) -> None:
            try:
                agent = client(server, episodes[index]["episode_id"])
                for turn in range(index + 1):
                    agent.chat.completions.create(
                        model="p", messages=[{"role": "user", "content": f"{index} {turn}"}]
                    )
            except Exception as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=play, args=(i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        store = server.gateway.store
        assert not errors
        for index, episode in enumerate(episodes):
            calls = store.get(episode["episode_id"]).calls
            assert len(calls) == index + 1
            assert all(tokenizer.decode(c.prompt_ids).split()[2] == str(index) for c in calls)


def error_of(response: httpx.Response) -> str:
    return response.json()["error"]["message"]


def test_an_unknown_episode_is_a_404_that_says_how_to_start_one(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        with pytest.raises(openai.NotFoundError, match="POST /forge/episodes"):
            client(server, "no-such-episode").chat.completions.create(
                model="p", messages=[{"role": "user", "content": "x"}]
            )


def test_malformed_json_is_a_400_and_recorded_calls_stay(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=[{"role": "user", "content": "x"}]
        )
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            content=b'{"messages": [',
            headers={"Authorization": f"Bearer {episode['episode_id']}", "Content-Type": "application/json"},
        )
        assert response.status_code == 400 and "not valid JSON" in error_of(response)
        assert len(server.gateway.store.get(episode["episode_id"]).calls) == 1


def test_a_body_without_messages_is_a_400_naming_the_field(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        response = httpx.post(
            f"{server.base_url}/chat/completions",
            json={"model": "p"},
            headers={"Authorization": f"Bearer {episode['episode_id']}"},
        )
    assert response.status_code == 400 and "messages" in error_of(response)


def test_a_prompt_over_the_context_limit_is_a_400(engine, tokenizer):
    with serve(engine, tokenizer, max_context_tokens=16) as server:
        episode = start(server)
        with pytest.raises(openai.BadRequestError, match="maximum context length is 16 tokens") as raised:
            client(server, episode["episode_id"]).chat.completions.create(
                model="p", messages=[{"role": "user", "content": "guess a number " * 10}]
            )
        assert raised.value.code == "context_length_exceeded"
        assert server.gateway.store.get(episode["episode_id"]).calls == []


def test_a_finished_episode_takes_no_more_calls(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        httpx.post(f"{server.root_url}/forge/episodes/{episode['episode_id']}/finish", json={"reward": 1.0})
        with pytest.raises(openai.ConflictError, match="already finished"):
            client(server, episode["episode_id"]).chat.completions.create(
                model="p", messages=[{"role": "user", "content": "x"}]
            )


def test_a_client_that_disconnects_mid_generation_loses_no_recorded_call(tokenizer):
    engine = ScriptedEngine([tokenizer.convert_tokens_to_ids("5"), tokenizer.eos_token_id])
    with serve(engine, tokenizer) as server:
        episode = start(server)
        messages = [{"role": "user", "content": "x"}]
        client(server, episode["episode_id"]).chat.completions.create(model="p", messages=messages)
        engine.delay_s = 1.0
        with pytest.raises(openai.APITimeoutError):
            client(server, episode["episode_id"], timeout=0.2).chat.completions.create(
                model="p", messages=messages
            )
        stored = server.gateway.store.get(episode["episode_id"])
        deadline = time.monotonic() + 10
        while "calls_dropped" not in stored.info and time.monotonic() < deadline:
            time.sleep(0.05)
        engine.delay_s = 0.0
        client(server, episode["episode_id"]).chat.completions.create(model="p", messages=messages)
    assert stored.info["calls_dropped"] == 1  # the reply it never received is not a sample
    assert len(stored.calls) == 2 and all(c.policy_version == 7 for c in stored.calls)


def test_the_example_agent_plays_one_episode_to_the_end(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        environment = {
            **os.environ,
            "OPENAI_BASE_URL": server.base_url,
            "OPENAI_API_KEY": episode["episode_id"],
            "FORGE_GATEWAY_URL": server.root_url,
            "FORGE_EPISODE_ID": episode["episode_id"],
            "FORGE_MAX_TURNS": "3",
        }
        subprocess.run(
            [sys.executable, "-m", "forge.openai_agent"],
            env=environment,
            check=True,
            timeout=120,
            capture_output=True,
        )
        played = server.gateway.store.get(episode["episode_id"])
    assert played.finished and 1 <= len(played.calls) <= 3
    assert played.steps == len(played.calls)  # each reply was one env action
