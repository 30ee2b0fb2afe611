"""Every field of an OpenAI request is honoured or refused by name, never ignored: through
the real `openai` SDK, the fields the gateway cannot honour (non-text content, non-function
tools, audio, reasoning effort, vLLM's sampling extras, a `best_of` beyond n) are 400s that
name them and record nothing; the ones it can honour (`allowed_tools`, Responses logprobs, a
streamed completion's usage) come back as the API documents them; a tool result that answers
no call is a 400 as the API's is."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import GUESS, HINT, ScriptedEngine, calls_of, client, serve, start

USER = [{"role": "user", "content": "guess"}]
WIDE = {"max_new_tokens": 200, "max_context_tokens": 4096}  # one token per byte: long prompts
CALL = '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A byte-level tokenizer with Qwen 2.5's (Hermes) tool-calling template."""
    return byte_level_tokenizer("qwen", tmp_path_factory.mktemp("qwen"))


def scripted(tokenizer, text: str) -> ScriptedEngine:
    return ScriptedEngine(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


@pytest.fixture(scope="module")
def served(qwen):
    """One gateway for the module; each test starts its own episode."""
    engine = scripted(qwen, "The number is 3.")
    with serve(engine, qwen, **WIDE) as server:
        yield server, engine


def say(served, qwen, text: str) -> None:
    served[1].reply = qwen(text, add_special_tokens=False)["input_ids"] + [qwen.eos_token_id]


# --- chat: refused by name, nothing recorded ------------------------------------------------

REFUSED_CHAT = [
    (
        "image_url",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this?"},
                        {"type": "image_url", "image_url": {"url": "http://x/a.png"}},
                    ],
                }
            ]
        },
    ),
    (
        "input_audio",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
                }
            ]
        },
    ),
    ("custom", {"tools": [{"type": "custom", "custom": {"name": "shell"}}]}),
    ("tools\\[1\\]", {"tools": [GUESS, {"type": "function", "name": "flat"}]}),
    ("modalities", {"modalities": ["text", "audio"]}),
    ("audio", {"audio": {"voice": "alloy", "format": "wav"}}),
    ("reasoning_effort", {"reasoning_effort": "low"}),
    ("verbosity", {"verbosity": "low"}),
    ("web_search_options", {"web_search_options": {}}),
    ("'top_k'", {"extra_body": {"top_k": 5}}),  # vLLM's sampling extras change the policy too
    ("'repetition_penalty'", {"extra_body": {"repetition_penalty": 1.2}}),
]


@pytest.mark.parametrize(("named", "fields"), REFUSED_CHAT, ids=[f"{i}" for i in range(len(REFUSED_CHAT))])
def test_a_chat_field_the_gateway_cannot_honour_is_a_400_naming_it(served, named, fields):
    server, _ = served
    episode = start(server)
    fields = {"messages": USER, **fields}
    with pytest.raises(openai.BadRequestError, match=named) as raised:
        client(server, episode["episode_id"]).chat.completions.create(model="p", **fields)
    assert raised.value.status_code == 400 and raised.value.type == "invalid_request_error"
    assert calls_of(server, episode) == []


def test_fields_that_change_no_reply_are_taken(served, qwen):
    server, _ = served
    say(served, qwen, "ok")
    episode = start(server)
    reply = client(server, episode["episode_id"]).chat.completions.create(
        model="p",
        messages=USER,
        store=True,
        metadata={"run": "a"},
        service_tier="auto",
        prediction={"type": "content", "content": "ok"},
        prompt_cache_key="k",
        safety_identifier="u",
        modalities=["text"],
        extra_body={"top_k": None},
    )
    assert reply.choices[0].message.content == "ok" and len(calls_of(server, episode)) == 1


def test_text_parts_of_every_role_are_read(served, qwen):
    server, engine = served
    say(served, qwen, "ok")
    episode = start(server)
    client(server, episode["episode_id"]).chat.completions.create(
        model="p",
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be brief."}]},
            {"role": "user", "content": [{"type": "text", "text": "gue"}, {"type": "text", "text": "ss"}]},
        ],
    )
    prompt = qwen.decode(engine.requests[-1].token_ids)
    assert (
        "<|im_start|>system\nBe brief.<|im_end|>" in prompt and "<|im_start|>user\nguess<|im_end|>" in prompt
    )


# --- chat: allowed_tools ------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "required"])
def test_allowed_tools_offers_only_the_listed_tools(served, qwen, mode):
    server, engine = served
    say(served, qwen, CALL if mode == "auto" else 'guess", "arguments": {"number": 3}}\n</tool_call>')
    episode = start(server)
    choice = {
        "type": "allowed_tools",
        "allowed_tools": {"mode": mode, "tools": [{"type": "function", "function": {"name": "guess"}}]},
    }
    reply = client(server, episode["episode_id"]).chat.completions.create(
        model="p", messages=USER, tools=[GUESS, HINT], tool_choice=choice
    )
    prompt = qwen.decode(engine.requests[-1].token_ids)
    assert '"name": "guess"' in prompt and '"name": "hint"' not in prompt
    assert prompt.endswith('<tool_call>\n{"name": "') == (mode == "required")
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "guess" and json.loads(call.function.arguments) == {"number": 3}


def test_allowed_tools_must_name_the_requests_tools(served):
    server, _ = served
    episode = start(server)
    choice = {
        "type": "allowed_tools",
        "allowed_tools": {"mode": "auto", "tools": [{"type": "function", "function": {"name": "nope"}}]},
    }
    with pytest.raises(openai.BadRequestError, match="allowed_tools names \\['nope'\\]"):
        client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, tools=[GUESS], tool_choice=choice
        )


# --- legacy completions ---------------------------------------------------------------------


def test_best_of_beyond_n_is_refused_and_equal_to_n_is_taken(served, qwen):
    server, _ = served
    say(served, qwen, "ok")
    episode = start(server)
    agent = client(server, episode["episode_id"])
    with pytest.raises(openai.BadRequestError, match="best_of=3 with n=1"):
        agent.completions.create(model="p", prompt="x", best_of=3)
    reply = agent.completions.create(model="p", prompt="x", best_of=2, n=2)
    assert [c.text for c in reply.choices] == ["ok", "ok"] and len(calls_of(server, episode)) == 2


def test_a_streamed_completion_ends_with_its_usage_when_asked(served, qwen):
    server, _ = served
    say(served, qwen, "ok")
    episode = start(server)
    chunks = list(
        client(server, episode["episode_id"]).completions.create(
            model="p", prompt=["ab", "c"], n=2, stream=True, stream_options={"include_usage": True}
        )
    )
    calls = calls_of(server, episode)
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == 3  # "ab" and "c", one token a byte
    assert chunks[-1].usage.completion_tokens == sum(len(c.completion_ids) for c in calls) == 4 * 3
    assert all(c.usage is None for c in chunks[:-1])


def test_a_refused_streamed_completion_generates_nothing(served):
    server, engine = served
    episode = start(server)
    asked = len(engine.requests)
    response = httpx.post(
        f"{server.base_url}/completions",
        headers={"Authorization": f"Bearer {episode['episode_id']}"},
        json={"model": "p", "prompt": "x", "stream": True, "logprobs": 1},
    )
    assert response.status_code == 400 and "logprobs" in response.json()["error"]["message"]
    time.sleep(0.3)  # a call started anyway would have reached the engine by now (batches wait 10 ms)
    assert len(engine.requests) == asked  # the engine was never asked


# --- the Responses API ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("named", "fields"),
    [
        ("'stop'", {"extra_body": {"stop": ["END"]}}),
        ("'n'", {"extra_body": {"n": 2}}),
        ("background", {"background": True}),
        ("reasoning", {"reasoning": {"effort": "low"}}),
        ("prompt", {"prompt": {"id": "pmpt_1"}}),
    ],
)
def test_a_responses_field_the_gateway_cannot_honour_is_a_400_naming_it(served, named, fields):
    server, _ = served
    episode = start(server)
    with pytest.raises(openai.BadRequestError, match=named):
        client(server, episode["episode_id"]).responses.create(model="p", input="x", **fields)
    assert calls_of(server, episode) == []


def test_responses_fields_that_change_no_reply_are_taken(served, qwen):
    server, _ = served
    say(served, qwen, "ok")
    episode = start(server)
    response = client(server, episode["episode_id"]).responses.create(
        model="p",
        input="x",
        store=False,
        metadata={"a": "b"},
        truncation="auto",
        max_tool_calls=2,
        include=["reasoning.encrypted_content"],
        prompt_cache_key="k",
        reasoning={"effort": None},
    )
    assert response.output_text == "ok"
    assert response.output[0].content[0].logprobs == []  # not asked for


@pytest.mark.parametrize("stream", [False, True])
def test_responses_logprobs_are_the_recorded_behaviour_logprobs(served, qwen, stream):
    server, _ = served
    say(served, qwen, "ok")
    episode = start(server)
    agent = client(server, episode["episode_id"])
    asked = {"model": "p", "input": "x", "include": ["message.output_text.logprobs"], "top_logprobs": 1}
    if stream:
        events = list(agent.responses.create(**asked, stream=True))
        done = next(e for e in events if e.type == "response.output_text.done")
        assert [t.token for t in done.logprobs][:2] == ["o", "k"]
        deltas = [e for e in events if e.type == "response.output_text.delta"]
        # Each delta carries the logprobs of the tokens sampled since the one before.
        assert [[t.token for t in d.logprobs] for d in deltas][:2] == [["o"], ["k"]]
        response = events[-1].response
    else:
        response = agent.responses.create(**asked)
    [call] = calls_of(server, episode)
    logprobs = response.output[0].content[0].logprobs
    assert [t.logprob for t in logprobs] == call.logprobs  # the end-of-turn token too, as chat lists it
    assert [t.token for t in logprobs][:2] == ["o", "k"] and logprobs[0].bytes == [ord("o")]
    assert [len(t.top_logprobs) for t in logprobs] == [1] * len(call.logprobs)


def test_responses_allowed_tools_offers_only_the_listed_tools(served, qwen):
    server, engine = served
    say(served, qwen, CALL)
    episode = start(server)
    tools = [{"type": "function", **GUESS["function"]}, {"type": "function", **HINT["function"]}]
    response = client(server, episode["episode_id"]).responses.create(
        model="p",
        input="x",
        tools=tools,
        tool_choice={
            "type": "allowed_tools",
            "mode": "auto",
            "tools": [{"type": "function", "name": "guess"}],
        },
    )
    prompt = qwen.decode(engine.requests[-1].token_ids)
    assert '"name": "guess"' in prompt and '"name": "hint"' not in prompt
    assert [item.type for item in response.output] == ["function_call"]


# --- malformed requests: a 400 naming the Responses API's own field, never a 500 -------------


@pytest.mark.parametrize(
    ("named", "fields"),
    [
        ("tools\\[0\\] has no name", {"tools": [{"type": "function", "parameters": {}}]}),
        ("input\\[0\\].role='tool'", {"input": [{"type": "message", "role": "tool", "content": "3"}]}),
        ("text.format.type='xml'", {"text": {"format": {"type": "xml"}}}),
        ("at most max_output_tokens=", {"max_output_tokens": 10**6}),
        # truncation "auto" does not cut the input from its front: the policy sees what was sent
        ("maximum context length is 4096", {"input": "x" * 5000, "truncation": "auto"}),
    ],
)
def test_a_malformed_responses_request_names_its_own_field(served, named, fields):
    server, _ = served
    episode = start(server)
    with pytest.raises(openai.BadRequestError, match=named):
        client(server, episode["episode_id"]).responses.create(model="p", **{"input": "x", **fields})
    assert calls_of(server, episode) == []


def test_a_history_tool_call_without_a_function_name_is_a_400_naming_it(served):
    server, _ = served
    episode = start(server)
    history = [
        *USER,
        {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]},
        {"role": "tool", "tool_call_id": "c1", "content": "x"},
    ]
    with pytest.raises(
        openai.BadRequestError, match="messages\\[1\\].tool_calls\\[0\\] has no function name"
    ):
        client(server, episode["episode_id"]).chat.completions.create(model="p", messages=history)


@pytest.mark.parametrize("prompt", ["", [""], [[]]])
def test_an_empty_completion_prompt_is_a_400_not_a_failed_generation(served, prompt):
    server, engine = served
    episode = start(server)
    asked = len(engine.requests)
    with pytest.raises(openai.BadRequestError, match="empty"):
        client(server, episode["episode_id"]).completions.create(model="p", prompt=prompt)
    assert len(engine.requests) == asked


def test_stored_response_routes_say_the_gateway_keeps_no_responses(served):
    server, _ = served
    agent = client(server, start(server)["episode_id"])
    for call in (
        lambda: agent.responses.retrieve("resp_1"),
        lambda: agent.responses.delete("resp_1"),
        lambda: agent.responses.cancel("resp_1"),
        lambda: agent.responses.input_items.list("resp_1"),
    ):
        with pytest.raises(openai.NotFoundError, match="cannot be read back"):
            call()


def test_a_field_sent_as_null_is_a_field_not_sent(served, qwen):
    """Agent code passes through what it was given (`n=kwargs.get("n")`): the SDK sends JSON
    nulls, which OpenAI's API reads as unset."""
    server, _ = served
    say(served, qwen, "ok")
    episode = start(server)
    agent = client(server, episode["episode_id"])
    nulls = {"n": None, "stream": None, "logprobs": None, "stop": None, "temperature": None, "seed": None}
    chat = agent.chat.completions.create(
        model="p", messages=USER, tools=None, tool_choice=None, response_format=None, max_tokens=None, **nulls
    )
    completion = agent.completions.create(model="p", prompt="x", echo=None, best_of=None, **nulls)
    response = agent.responses.create(
        model="p", input="x", stream=None, tools=None, instructions=None, store=None, temperature=None
    )
    assert chat.choices[0].message.content == completion.choices[0].text == response.output_text == "ok"
    assert len(calls_of(server, episode)) == 3


def test_chat_template_kwargs_reach_the_template(tmp_path):
    """Qwen3 agents written for vLLM turn thinking off with extra_body chat_template_kwargs;
    the gateway hands them to the template (it was ignored: the policy thought anyway)."""
    tokenizer = byte_level_tokenizer("qwen", tmp_path)
    # Qwen3's own switch, after the generation prompt.
    tokenizer.chat_template += (
        "{%- if add_generation_prompt and enable_thinking is defined and enable_thinking is false %}"
        "{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    )
    engine = scripted(tokenizer, "ok")
    with serve(engine, tokenizer, **WIDE) as server:
        agent = client(server, start(server)["episode_id"])
        agent.chat.completions.create(model="p", messages=USER)
        agent.chat.completions.create(
            model="p", messages=USER, extra_body={"chat_template_kwargs": {"enable_thinking": False}}
        )
        with pytest.raises(openai.BadRequestError, match="chat_template_kwargs may not set tools"):
            agent.chat.completions.create(
                model="p", messages=USER, extra_body={"chat_template_kwargs": {"tools": []}}
            )
    thinking, not_thinking = (tokenizer.decode(request.token_ids) for request in engine.requests)
    assert not thinking.endswith("</think>\n\n") and not_thinking == thinking + "<think>\n\n</think>\n\n"


# --- tool results that answer no call: a 400 as OpenAI's API gives, nothing generated ---------

ASKED = {
    "role": "assistant",
    "content": None,
    "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "guess", "arguments": '{"number": 3}'}}
    ],
}
ANSWER = {"role": "tool", "tool_call_id": "call_1", "content": "higher"}


@pytest.mark.parametrize(
    ("named", "history"),
    [
        (
            "messages\\[2\\].tool_call_id 'call_9' is not found in the tool_calls of the assistant "
            "message before it \\(messages\\[1\\], ids \\['call_1'\\]\\)",
            [*USER, ASKED, {**ANSWER, "tool_call_id": "call_9"}],
        ),
        (
            "messages\\[1\\]: messages with role 'tool' must be a response to a preceding message with "
            "'tool_calls' \\(messages\\[0\\] has none\\)",
            [*USER, ANSWER],
        ),
        (
            "messages\\[4\\]: messages with role 'tool' must be a response .*messages\\[3\\] has none",
            [*USER, ASKED, ANSWER, {"role": "user", "content": "and?"}, ANSWER],
        ),
        ("messages\\[2\\].tool_call_id None is not found", [*USER, ASKED, {"role": "tool", "content": "x"}]),
    ],
    ids=["unknown id", "no call before", "a user message between", "no id"],
)
def test_a_chat_tool_result_that_answers_no_call_is_a_400_naming_it(served, named, history):
    server, engine = served
    episode = start(server)
    asked = len(engine.requests)
    with pytest.raises(openai.BadRequestError, match=named):
        client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=history, tools=[GUESS]
        )
    assert len(engine.requests) == asked and calls_of(server, episode) == []


TWO_ASKED = {
    **ASKED,
    "tool_calls": [*ASKED["tool_calls"], {**ASKED["tool_calls"][0], "id": "call_2"}],
}


@pytest.mark.parametrize(
    ("named", "history"),
    [
        (
            "messages\\[1\\]: an assistant message with 'tool_calls' must be followed by tool messages "
            "responding to each 'tool_call_id'; these had none: 'call_1' \\(messages\\[2\\] is a user message\\)",
            [*USER, ASKED, {"role": "user", "content": "and?"}],
        ),
        ("these had none: 'call_2' \\(messages\\[3\\] is a user", [*USER, TWO_ASKED, ANSWER, *USER]),
        ("these had none: 'call_1', 'call_2' \\(the conversation ends there\\)", [*USER, TWO_ASKED]),
    ],
    ids=["a user message after", "one of two answered", "the last message"],
)
def test_a_chat_tool_call_without_its_result_is_a_400_naming_the_missing_ids(served, named, history):
    server, engine = served
    episode = start(server)
    asked = len(engine.requests)
    with pytest.raises(openai.BadRequestError, match=named) as refused:
        client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=history, tools=[GUESS]
        )
    assert refused.value.body["type"] == "invalid_request_error"
    assert len(engine.requests) == asked and calls_of(server, episode) == []


def responses_call_made(served, qwen):
    """An episode whose agent asked once through the Responses API, with the guess tool, and
    got a function call back: (server, engine, episode, agent client, tools, that response)."""
    server, engine = served
    say(served, qwen, CALL)
    episode = start(server)
    agent = client(server, episode["episode_id"])
    tools = [{"type": "function", **GUESS["function"]}]
    return (
        server,
        engine,
        episode,
        agent,
        tools,
        agent.responses.create(model="p", input="Guess.", tools=tools),
    )


def test_a_responses_function_call_output_that_answers_no_call_is_a_400_naming_the_call_id(served, qwen):
    server, engine, episode, agent, tools, first = responses_call_made(served, qwen)
    [function_call] = first.output
    stray = {"type": "function_call_output", "call_id": "call_stray", "output": "higher"}
    asked = len(engine.requests)
    in_chain = (
        f"input\\[0\\]: no tool call found for function call output with call_id 'call_stray'.*'{first.id}'"
    )
    with pytest.raises(openai.BadRequestError, match=in_chain):
        agent.responses.create(model="p", input=[stray], tools=tools, previous_response_id=first.id)
    with pytest.raises(openai.BadRequestError, match="input\\[1\\]: .*'call_stray'.*no previous_response_id"):
        agent.responses.create(model="p", input=[{"role": "user", "content": "x"}, stray], tools=tools)
    assert len(engine.requests) == asked and len(calls_of(server, episode)) == 1
    # An output answering a call of the chain, or of its own input, is taken.
    answer = {"type": "function_call_output", "call_id": function_call.call_id, "output": "higher"}
    say(served, qwen, "ok")
    agent.responses.create(model="p", input=[answer], tools=tools, previous_response_id=first.id)
    agent.responses.create(
        model="p", input=[function_call.model_dump(exclude_none=True), answer], tools=tools
    )
    assert len(calls_of(server, episode)) == 3


def test_a_responses_function_call_without_its_output_is_a_400_naming_the_call_id(served, qwen):
    """As the API's "No tool output found for function call ..." (param input): whether the
    call is the previous response's or one of this request's input items."""
    server, engine, episode, agent, tools, first = responses_call_made(served, qwen)
    [function_call] = first.output
    call_id = function_call.call_id
    asked = len(engine.requests)
    with pytest.raises(
        openai.BadRequestError,
        match=f"previous_response_id's item 1: no tool output found for function call '{call_id}'",
    ) as refused:
        agent.responses.create(model="p", input="And now?", tools=tools, previous_response_id=first.id)
    assert refused.value.param == "input"
    with pytest.raises(
        openai.BadRequestError, match=f"input\\[1\\]: no tool output found for function call '{call_id}'"
    ):
        agent.responses.create(
            model="p",
            input=[{"role": "user", "content": "x"}, function_call.model_dump(exclude_none=True)],
            tools=tools,
        )
    assert len(engine.requests) == asked and len(calls_of(server, episode)) == 1


# --- malformed tools and content: a 400 that says what is wrong, never a 500 ------------------

FUNCTION_OUTPUT = [
    {"type": "function_call", "call_id": "c1", "name": "guess", "arguments": '{"number": 3}'},
    {"type": "function_call_output", "call_id": "c1", "output": {"result": "higher"}},
]


@pytest.mark.parametrize(
    ("named", "route", "fields"),
    [
        (
            "tools\\[0\\].function.name is missing",
            "chat",
            {"tools": [{"type": "function", "function": {"parameters": {}}}]},
        ),
        (
            "tools\\[0\\] is in the Responses API's shape",
            "chat",
            {"tools": [{"type": "function", "name": "guess", "parameters": {}}]},
        ),
        (
            "tools\\[0\\].function.parameters must be a JSON Schema object, got str",
            "chat",
            {"tools": [{"type": "function", "function": {"name": "guess", "parameters": "number"}}]},
        ),
        (
            "messages\\[0\\]: content part 0's text must be a string, got int",
            "chat",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
        ),
        ("tools\\[0\\] is in the chat completions API's shape", "responses", {"tools": [GUESS]}),
        (
            "tools\\[0\\].parameters must be a JSON Schema object, got list",
            "responses",
            {"tools": [{"type": "function", "name": "guess", "parameters": []}]},
        ),
        (
            "input\\[1\\].output: message content must be a string or a list of text parts, got dict",
            "responses",
            {"input": FUNCTION_OUTPUT},
        ),
    ],
    ids=[
        "chat tool without a name",
        "chat tool in the responses shape",
        "chat parameters not an object",
        "chat text part not a string",
        "responses tool in the chat shape",
        "responses parameters not an object",
        "responses output not text",
    ],
)
def test_malformed_tools_and_content_are_a_400_saying_what_is_wrong(served, named, route, fields):
    server, engine = served
    episode = start(server)
    agent = client(server, episode["episode_id"])
    asked = len(engine.requests)
    with pytest.raises(openai.BadRequestError, match=named):
        if route == "chat":
            agent.chat.completions.create(model="p", **{"messages": USER, **fields})
        else:
            agent.responses.create(model="p", **{"input": "x", **fields})
    assert len(engine.requests) == asked and calls_of(server, episode) == []


def test_a_lone_surrogate_in_a_message_is_read_as_the_replacement_character(served, qwen):
    """JSON may escape a lone UTF-16 surrogate ("\\udcff": what `json.dumps` writes for text
    read with surrogateescape, e.g. a file name that is not UTF-8, and what JavaScript's
    JSON.stringify writes for half a pair); no UTF-8 tokenizer can encode one, so the
    prompt holds U+FFFD in its place, as Forge reads any bytes that are not text."""
    server, _ = served
    say(served, qwen, "ok")
    episode = start(server)
    body = {"model": "p", "messages": [{"role": "user", "content": "ls: caf\udcff.txt"}]}
    response = httpx.post(
        f"{server.base_url}/chat/completions",
        content=json.dumps(body),  # ensure_ascii: the surrogate travels as its escape
        headers={"Authorization": f"Bearer {episode['episode_id']}", "Content-Type": "application/json"},
    )
    assert response.status_code == 200, response.text
    [call] = calls_of(server, episode)
    assert "ls: caf\ufffd.txt" in qwen.decode(call.prompt_ids)


def test_an_unknown_episode_error_says_only_the_start_of_an_api_key_that_is_no_episode_id(served):
    server, _ = served
    secret = "sk-proj-" + "x7" * 20  # an agent's real OpenAI key, left in its environment
    with pytest.raises(openai.NotFoundError) as refused:
        client(server, secret).chat.completions.create(model="p", messages=USER)
    said = refused.value.response.json()["error"]["message"]
    assert secret not in said and "api key 'sk-p'..." in said
    gone = "ep-000999-0badc0de"  # an episode id, which says which one was not found
    with pytest.raises(openai.NotFoundError, match=f"api key='{gone}'"):
        client(server, gone).chat.completions.create(model="p", messages=USER)
