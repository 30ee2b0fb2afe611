"""The OpenAI API as agent frameworks use it, through the real `openai` SDK (sync and
async) on loopback: stop strings, limits, n, seed, top logprobs, tool_choice, parallel
tool calls, json mode, errors on every route, completions, token-by-token streaming and
the sampling rule; each call recorded token-exact."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import (
    GUESS,
    HINT,
    ScriptedEngine,
    async_client,
    calls_of,
    client,
    serve,
    start,
    with_byte_runs_made_valid,
)

from forge.config import ModelConfig
from forge.models.loading import load_model, load_tokenizer
from forge.rollout.engines.hf import HFEngine
from forge.rollout.engines.protocol import GenerationRequest

USER = [{"role": "user", "content": "guess"}]
BYTES = {"max_new_tokens": 200, "max_context_tokens": 4096}  # one token per byte: long prompts


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint):
    return load_tokenizer(tiny_checkpoint)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tokenizer) -> HFEngine:
    return HFEngine(
        load_model(tiny_checkpoint, ModelConfig()), [tokenizer.eos_token_id], tokenizer.pad_token_id
    )


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A byte-level tokenizer with Qwen 2.5's (Hermes) tool-calling template."""
    return byte_level_tokenizer("qwen", tmp_path_factory.mktemp("qwen"))


def scripted(tokenizer, text: str, **options) -> ScriptedEngine:
    return ScriptedEngine(
        tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id], **options
    )


def recorded_text(tokenizer, call) -> str:
    """The text of a recorded reply as the gateway decodes it (byte pieces that spell no
    character as U+FFFD each, the characters around them kept)."""
    text_ids = [t for t in call.completion_ids if t not in tokenizer.all_special_ids]
    return tokenizer.decode(with_byte_runs_made_valid(tokenizer, text_ids), skip_special_tokens=True)


# --- stop -----------------------------------------------------------------------------


def test_a_stop_string_ends_the_reply_and_the_sample_token_exact(engine, tokenizer):
    with serve(engine, tokenizer, max_new_tokens=40) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        # A seeded reply that starts with four whole-word tokens, so the stop string (its third
        # word) is a token of its own; which seed gives one turns on the tiny model's weights.
        for seed in range(11, 41):
            free = agent.chat.completions.create(model="p", messages=USER, seed=seed, max_tokens=40)
            words = free.choices[0].message.content.split()
            if len(words) >= 4 and all(
                len(tokenizer.encode(w, add_special_tokens=False)) == 1 for w in words[:4]
            ):
                break
        else:
            pytest.fail("no seed in 11-40 gave a reply of four whole words to stop inside")
        stop = words[2]
        stopped = agent.chat.completions.create(
            model="p", messages=USER, seed=seed, max_tokens=40, stop=[stop], logprobs=True
        )
        *_, call = calls_of(server, episode)
    choice = stopped.choices[0]
    assert choice.finish_reason == "stop"
    assert stop not in choice.message.content.split()
    assert choice.message.content.split() == words[: words.index(stop)]
    # The sample ends on the token that completed the stop string, and is what the reply listed.
    assert tokenizer.decode(call.completion_ids[-1:]) == stop
    assert [t.logprob for t in choice.logprobs.content] == call.logprobs
    assert stopped.usage.completion_tokens == len(call.completion_ids)


def test_a_stop_string_split_over_tokens_is_cut_and_never_streamed(qwen):
    engine = scripted(qwen, "Thought: go\nObservation: never")
    with serve(engine, qwen, **BYTES) as server:
        episode = start(server)
        stream = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, stop=["\nObservation:"], stream=True
        )
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        [call] = calls_of(server, episode)
    assert streamed == "Thought: go"
    assert recorded_text(qwen, call) == "Thought: go\nObservation:"  # generation ended at the stop


# --- limits ---------------------------------------------------------------------------


def test_max_tokens_is_honoured_past_the_runs_default_up_to_the_context(tokenizer):
    engine = ScriptedEngine([tokenizer.convert_tokens_to_ids("5")] * 30)
    with serve(engine, tokenizer, max_new_tokens=6, max_context_tokens=64) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        default = agent.chat.completions.create(model="p", messages=USER)
        longer = agent.chat.completions.create(model="p", messages=USER, max_completion_tokens=20)
        with pytest.raises(openai.BadRequestError, match="at most max_tokens=") as raised:
            agent.chat.completions.create(model="p", messages=USER, max_tokens=200)
    assert default.usage.completion_tokens == 6 and default.choices[0].finish_reason == "length"
    assert longer.usage.completion_tokens == 20
    assert raised.value.code == "context_length_exceeded" and "maximum context length is 64" in str(
        raised.value
    )


# --- n and seed -----------------------------------------------------------------------


def test_n_choices_share_one_prefill_and_each_is_a_sample(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        before = server.gateway.batching.prefill_tokens
        reply = client(server, episode["episode_id"]).chat.completions.create(model="p", messages=USER, n=3)
        prefilled = server.gateway.batching.prefill_tokens - before
        calls = calls_of(server, episode)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len(calls) == 3 and prefilled == len(calls[0].prompt_ids)
    assert [c.message.content for c in reply.choices] == [recorded_text(tokenizer, c) for c in calls]
    assert reply.usage.completion_tokens == sum(len(c.completion_ids) for c in calls)


def test_a_seed_repeats_the_reply_and_another_seed_need_not(engine, tokenizer):
    with serve(engine, tokenizer, max_new_tokens=20) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        first, again, other = (
            agent.chat.completions.create(model="p", messages=USER, seed=seed).choices[0]
            for seed in (5, 5, 6)
        )
        calls = calls_of(server, episode)
    assert first.message.content == again.message.content
    assert calls[0].completion_ids == calls[1].completion_ids != calls[2].completion_ids


# --- logprobs -------------------------------------------------------------------------


def test_top_logprobs_are_real_with_decoded_strings_and_bytes(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, logprobs=True, top_logprobs=3, seed=13, max_tokens=4
        )
        [call] = calls_of(server, episode)
    entries = reply.choices[0].logprobs.content
    # Seeded to a reply of whole words ('10 is again 15' on the tiny Llama): a byte piece's text
    # does not name the piece. A token's text has a space where its piece has the word-start mark.
    assert [
        tokenizer.convert_tokens_to_ids(e.token.replace(" ", "\u2581")) for e in entries
    ] == call.completion_ids
    for entry, logprob in zip(entries, call.logprobs, strict=True):
        assert entry.logprob == logprob and entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 3
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and values[0] >= logprob
        assert all(top.bytes == list(top.token.encode()) for top in entry.top_logprobs)


def test_logprob_bytes_of_a_byte_level_token_are_its_raw_bytes(qwen):
    engine = scripted(qwen, "é the")
    with serve(engine, qwen, **BYTES) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, logprobs=True
        )
    entries = reply.choices[0].logprobs.content
    assert [e.bytes for e in entries[:3]] == [[0xC3], [0xA9], list(b" the")]
    assert b"".join(bytes(e.bytes) for e in entries[:3]).decode() == "é the"


# --- tools ----------------------------------------------------------------------------


def test_tool_choice_none_neither_shows_nor_parses_tools(qwen):
    engine = scripted(qwen, '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>')
    with serve(engine, qwen, **BYTES) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, tools=[GUESS], tool_choice="none"
        )
        [call] = calls_of(server, episode)
    assert reply.choices[0].message.tool_calls is None and "<tool_call>" in reply.choices[0].message.content
    plain = qwen.apply_chat_template(USER, add_generation_prompt=True, tokenize=False)
    assert call.prompt_ids == qwen(plain, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "hint"}}])
def test_a_required_or_named_tool_choice_opens_the_call_for_the_model(qwen, tool_choice):
    named = isinstance(tool_choice, dict)
    rest = "{}}\n</tool_call>" if named else 'hint", "arguments": {}}\n</tool_call>'
    engine = scripted(qwen, rest)
    with serve(engine, qwen, **BYTES) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, tools=[GUESS, HINT], tool_choice=tool_choice
        )
        [call] = calls_of(server, episode)
    [tool_call] = reply.choices[0].message.tool_calls
    assert tool_call.function.name == "hint" and json.loads(tool_call.function.arguments) == {}
    assert reply.choices[0].finish_reason == "tool_calls"
    opening = qwen.decode(call.prompt_ids).split("<|im_start|>assistant")[-1]
    assert opening == ('<tool_call>\n{"name": "hint", "arguments": ' if named else '<tool_call>\n{"name": "')
    assert recorded_text(qwen, call) == rest  # the sample holds only what the model wrote


def test_a_named_tool_choice_must_name_one_of_the_tools(qwen):
    with serve(scripted(qwen, "x"), qwen, **BYTES) as server:
        episode = start(server)
        with pytest.raises(openai.BadRequestError, match="not among the request's tools"):
            client(server, episode["episode_id"]).chat.completions.create(
                model="p",
                messages=USER,
                tools=[GUESS],
                tool_choice={"type": "function", "function": {"name": "x"}},
            )


def test_parallel_tool_calls_come_back_together_unless_turned_off(qwen):
    two = (
        '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>\n'
        '<tool_call>\n{"name": "hint", "arguments": {}}\n</tool_call>'
    )
    with serve(scripted(qwen, two), qwen, **BYTES) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        both = agent.chat.completions.create(model="p", messages=USER, tools=[GUESS, HINT])
        one = agent.chat.completions.create(
            model="p", messages=USER, tools=[GUESS, HINT], parallel_tool_calls=False
        )
    assert [c.function.name for c in both.choices[0].message.tool_calls] == ["guess", "hint"]
    assert len({c.id for c in both.choices[0].message.tool_calls}) == 2
    assert [c.function.name for c in one.choices[0].message.tool_calls] == ["guess"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_cut_at_max_tokens_after_a_tool_call_finishes_as_length(qwen, stream):
    # The second call was cut at max_tokens: the reply is incomplete, as the Responses API
    # says of it (status incomplete), so its finish_reason is "length", not "tool_calls".
    call = '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>\n'
    cut = len(qwen(call + '<tool_call>\n{"name"', add_special_tokens=False)["input_ids"])
    with serve(scripted(qwen, call + call), qwen, **BYTES) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        asked = {"model": "p", "messages": USER, "tools": [GUESS], "max_tokens": cut}
        if stream:
            chunks = [c.choices[0] for c in agent.chat.completions.create(**asked, stream=True) if c.choices]
            reason = chunks[-1].finish_reason
            calls = [call for c in chunks for call in c.delta.tool_calls or []]
        else:
            reply = agent.chat.completions.create(**asked).choices[0]
            reason, calls = reply.finish_reason, reply.message.tool_calls
    assert reason == "length"
    assert [json.loads(c.function.arguments) for c in calls] == [{"number": 3}]


def test_json_mode_opens_an_object_and_ends_where_it_closes(qwen):
    engine = scripted(qwen, '"answer": {"n": "}"}} and more')
    with serve(engine, qwen, **BYTES) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, response_format={"type": "json_object"}
        )
        [call] = calls_of(server, episode)
    assert json.loads(reply.choices[0].message.content) == {"answer": {"n": "}"}}
    assert reply.choices[0].finish_reason == "stop"
    assert recorded_text(qwen, call) == '"answer": {"n": "}"}}'


# --- errors, models, completions -------------------------------------------------------


def test_every_route_answers_errors_as_openai_error_objects(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        unknown = httpx.post(f"{server.base_url}/embeddings", json={"input": "x"})
        wrong_method = httpx.get(f"{server.base_url}/chat/completions")
        episode_404 = httpx.get(f"{server.root_url}/forge/episodes/nope")
        with pytest.raises(openai.NotFoundError) as missing_model:
            client(server, "x").models.retrieve("gpt-4o")
    for response, status in ((unknown, 404), (wrong_method, 405), (episode_404, 404)):
        error = response.json()["error"]
        assert response.status_code == status and set(error) == {"message", "type", "param", "code"}
    assert "POST /v1/embeddings" in unknown.json()["error"]["message"]
    assert "forge-policy" in str(missing_model.value)


def test_models_retrieve_names_the_policy(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        model = client(server, "x").models.retrieve("forge-policy")
    assert model.id == "forge-policy" and model.owned_by == "forge"


def test_completions_take_a_list_of_prompts_and_token_ids(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        ids = tokenizer("1 2 3", add_special_tokens=False)["input_ids"]
        reply = client(server, episode["episode_id"]).completions.create(
            model="p", prompt=["guess a number", "try again"], n=2, max_tokens=3, logprobs=2
        )
        by_ids = client(server, episode["episode_id"]).completions.create(model="p", prompt=ids, max_tokens=3)
        calls = calls_of(server, episode)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert [c.prompt_ids for c in calls] == [
        tokenizer(p, add_special_tokens=False)["input_ids"]
        for p in ("guess a number",) * 2 + ("try again",) * 2
    ] + [ids]
    for choice, call in zip(reply.choices, calls, strict=False):
        assert choice.text == recorded_text(tokenizer, call)
        assert choice.logprobs.token_logprobs == call.logprobs
    assert by_ids.choices[0].text == recorded_text(tokenizer, calls[-1])


def test_unsupported_sampling_fields_are_refused_by_name(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        with pytest.raises(openai.BadRequestError, match="presence_penalty"):
            client(server, episode["episode_id"]).chat.completions.create(
                model="p", messages=USER, presence_penalty=0.5
            )


# --- streaming ------------------------------------------------------------------------


def test_the_first_chunk_leaves_before_generation_ends_with_logprobs(qwen):
    engine = scripted(qwen, "one two three four", token_delay_s=0.05)
    with serve(engine, qwen, **BYTES) as server:
        episode = start(server)
        stream = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, stream=True, logprobs=True
        )
        first_content_at, chunks = None, []
        for chunk in stream:
            chunks.append(chunk)
            if first_content_at is None and chunk.choices and chunk.choices[0].delta.content:
                first_content_at = time.monotonic()
        [call] = calls_of(server, episode)
    assert first_content_at is not None and first_content_at < engine.finished_at - 0.3
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three four" == recorded_text(qwen, call)
    streamed = [
        e.logprob
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for e in c.choices[0].logprobs.content
    ]
    assert streamed == call.logprobs


def test_the_real_engines_first_chunk_arrives_while_it_is_still_generating(tiny_checkpoint, tokenizer):
    model = load_model(tiny_checkpoint, ModelConfig())
    endless = HFEngine(model, [], tokenizer.pad_token_id)  # no stop token: runs to max_tokens
    with serve(endless, tokenizer, max_context_tokens=512) as server:
        episode = start(server)
        # Greedy: a sampled reply of the random model can wander into byte pieces that spell no
        # character, which a stream holds back to the end; this test is about when text arrives.
        stream = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, stream=True, max_tokens=120, temperature=0
        )
        recorded_at_first_chunk = None
        chunks = []
        for chunk in stream:
            chunks.append(chunk)
            if recorded_at_first_chunk is None and chunk.choices and chunk.choices[0].delta.content:
                recorded_at_first_chunk = len(calls_of(server, episode))
        [call] = calls_of(server, episode)
    assert recorded_at_first_chunk == 0  # the call is recorded when generation ends: it had not
    assert len(call.completion_ids) == 120
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == recorded_text(
        tokenizer, call
    )


def test_a_streamed_tool_call_is_held_back_and_sent_whole(qwen):
    engine = scripted(
        qwen, 'Let me guess.\n<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>'
    )
    with serve(engine, qwen, **BYTES) as server:
        episode = start(server)
        chunks = list(
            client(server, episode["episode_id"]).chat.completions.create(
                model="p", messages=USER, tools=[GUESS], stream=True
            )
        )
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert content == "Let me guess." and "<tool" not in content
    assert [c.function.name for c in calls] == ["guess"] and json.loads(calls[0].function.arguments) == {
        "number": 3
    }
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_client_that_leaves_mid_stream_ends_generation_and_the_call_is_not_a_sample(qwen):
    engine = scripted(qwen, "word " * 40, token_delay_s=0.02)
    with serve(engine, qwen, **BYTES) as server:
        episode = start(server)
        stream = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, stream=True
        )
        for received, _ in enumerate(stream):
            if received == 3:
                break
        stream.close()
        stored = server.gateway.store.get(episode["episode_id"])
        deadline = time.monotonic() + 10
        while "calls_dropped" not in stored.info and time.monotonic() < deadline:
            time.sleep(0.05)
    assert stored.info.get("calls_dropped") == 1 and stored.calls == []
    assert engine.generated[0] < len(engine.reply)  # generation stopped when the client left


class FailingEngine(ScriptedEngine):
    def generate(self, requests):
        raise RuntimeError("the device fell over")


def test_a_generation_that_fails_mid_stream_ends_it_with_an_openai_error(tokenizer):
    with serve(FailingEngine([]), tokenizer) as server:
        episode = start(server)
        stream = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, stream=True
        )
        with pytest.raises(openai.APIError, match="generation failed: RuntimeError: the device fell over"):
            list(stream)
        stored = server.gateway.store.get(episode["episode_id"])
    assert stored.calls == [] and "calls_dropped" not in stored.info


def test_n_streamed_choices_arrive_by_index(engine, tokenizer):
    with serve(engine, tokenizer) as server:
        episode = start(server)
        chunks = list(
            client(server, episode["episode_id"]).chat.completions.create(
                model="p", messages=USER, n=2, stream=True
            )
        )
        calls = calls_of(server, episode)
    texts = [
        "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and c.choices[0].index == i)
        for i in range(2)
    ]
    assert texts == [recorded_text(tokenizer, call) for call in calls]
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1]


def test_the_async_client_chats_and_streams(engine, tokenizer):
    async def play(server, episode_id):
        agent = async_client(server, episode_id)
        reply = await agent.chat.completions.create(model="p", messages=USER)
        stream = await agent.chat.completions.create(
            model="p", messages=USER, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        await agent.close()
        return reply, chunks

    with serve(engine, tokenizer) as server:
        episode = start(server)
        reply, chunks = asyncio.run(play(server, episode["episode_id"]))
        first, second = calls_of(server, episode)
    assert reply.choices[0].message.content == recorded_text(tokenizer, first)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == recorded_text(
        tokenizer, second
    )
    assert chunks[-1].usage.completion_tokens == len(second.completion_ids)


def test_concurrent_calls_of_one_episode_sample_and_record_as_they_would_alone(engine, tokenizer):
    """Agents fire calls of one episode at once (asyncio.gather over tools, sub-agents): they
    share the episode's name for cached KV, yet each is sampled and recorded as it is alone."""
    seeds = range(5)

    async def together(server, episode_id):
        agent = async_client(server, episode_id)
        replies = await asyncio.gather(
            *(agent.chat.completions.create(model="p", messages=USER, seed=s, logprobs=True) for s in seeds)
        )
        await agent.close()
        return replies

    with serve(engine, tokenizer) as server:
        alone_episode = start(server)
        agent = client(server, alone_episode["episode_id"])
        alone = [
            agent.chat.completions.create(model="p", messages=USER, seed=s, logprobs=True) for s in seeds
        ]
        episode = start(server, task_id="t1")
        replies = asyncio.run(together(server, episode["episode_id"]))
        calls = calls_of(server, episode)
    assert len(calls) == len(seeds)
    for solo, reply in zip(alone, replies, strict=True):
        assert reply.choices[0].message.content == solo.choices[0].message.content
        got = [t.logprob for t in reply.choices[0].logprobs.content]
        assert got == pytest.approx([t.logprob for t in solo.choices[0].logprobs.content], abs=1e-4)
        assert got in [c.logprobs for c in calls]  # recorded as replied


# --- the sampling rule ------------------------------------------------------------------


def test_honoured_sampling_records_the_requests_distribution(engine, tokenizer):
    with serve(engine, tokenizer, sampling="honour") as server:
        episode = start(server)
        raw = client(server, episode["episode_id"]).chat.completions.with_raw_response.create(
            model="p", messages=USER, temperature=0
        )
        [call] = calls_of(server, episode)
    assert "x-forge-sampling" not in raw.headers
    greedy = engine.generate([GenerationRequest(call.prompt_ids, len(call.completion_ids), temperature=0.0)])[
        0
    ]
    assert call.completion_ids == greedy.token_ids


def test_overridden_sampling_says_so_in_a_header(tokenizer):
    engine = ScriptedEngine([tokenizer.eos_token_id])
    with serve(engine, tokenizer, sampling="override") as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        raw = agent.chat.completions.with_raw_response.create(model="p", messages=USER, temperature=0.2)
        plain = agent.chat.completions.with_raw_response.create(model="p", messages=USER, temperature=1.0)
    assert raw.headers["x-forge-sampling"] == "overridden temperature=0.2->1.0 (gateway.sampling=override)"
    assert "x-forge-sampling" not in plain.headers
    assert [r.temperature for r in engine.requests] == [None, None]  # the engine's own setting ran


@pytest.mark.parametrize("rule", ["override", "honour"])
def test_a_training_runs_gateway_follows_gateway_sampling(tokenizer, rule):
    from forge.config import Config
    from forge.gateway import EpisodeStore, GatewayServer
    from forge.run.gateway import run_gateway

    cfg = Config() if rule == "override" else Config.model_validate({"gateway": {"sampling": rule}})
    engine = ScriptedEngine([tokenizer.eos_token_id])
    gateway = run_gateway(cfg, engine, tokenizer, EpisodeStore())
    with GatewayServer(gateway) as server:
        episode = start(server)
        raw = client(server, episode["episode_id"]).chat.completions.with_raw_response.create(
            model="p", messages=USER, temperature=0.3, top_p=0.9
        )
    [request] = engine.requests
    if rule == "override":  # the default: the run's settings, and a header saying so
        assert (request.temperature, request.top_p) == (None, None)
        assert raw.headers["x-forge-sampling"] == (
            "overridden temperature=0.3->1.0, top_p=0.9->1.0 (gateway.sampling=override)"
        )
    else:
        assert (request.temperature, request.top_p) == (0.3, 0.9) and "x-forge-sampling" not in raw.headers
