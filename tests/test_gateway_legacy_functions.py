"""Chat Completions' deprecated `functions` / `function_call`, through the real `openai` SDK:
translated to tools and tool_choice (the model sees exactly the prompt the tools form gives,
and that is what is recorded), answered in the legacy shape (`message.function_call`,
finish_reason "function_call", `delta.function_call` when streamed), with legacy history
(an assistant `function_call`, a role `function` result) read as tool turns."""

from __future__ import annotations

import json

import openai
import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import GUESS, HINT, ScriptedEngine, calls_of, client, serve, start

USER = [{"role": "user", "content": "guess"}]
WIDE = {"max_new_tokens": 200, "max_context_tokens": 4096}
CALL = '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>'
HINT_CALL = '<tool_call>\n{"name": "hint", "arguments": {}}\n</tool_call>'
FUNCTIONS = [GUESS["function"], HINT["function"]]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """A byte-level tokenizer with Qwen 2.5's (Hermes) tool-calling template."""
    return byte_level_tokenizer("qwen", tmp_path_factory.mktemp("qwen"))


@pytest.fixture(scope="module")
def served(qwen):
    engine = ScriptedEngine([])
    with serve(engine, qwen, **WIDE) as server:
        yield server, engine


def say(served, qwen, text: str) -> None:
    served[1].reply = qwen(text, add_special_tokens=False)["input_ids"] + [qwen.eos_token_id]


def prompts(served, qwen, *requests: dict) -> list[list[int]]:
    """The prompt ids the engine was given for each request (each in its own episode)."""
    server, engine = served
    out = []
    for fields in requests:
        client(server, start(server)["episode_id"]).chat.completions.create(model="p", **fields)
        out.append(engine.requests[-1].token_ids)
    return out


def test_a_function_call_comes_back_in_the_legacy_shape_and_is_recorded_as_sampled(served, qwen):
    server, engine = served
    say(served, qwen, "Trying 3.\n" + CALL)
    episode = start(server)
    reply = client(server, episode["episode_id"]).chat.completions.create(
        model="p", messages=USER, functions=FUNCTIONS
    )
    [choice] = reply.choices
    assert choice.finish_reason == "function_call" and choice.message.tool_calls is None
    assert choice.message.function_call.name == "guess"
    assert json.loads(choice.message.function_call.arguments) == {"number": 3}
    assert choice.message.content == "Trying 3."
    [call] = calls_of(server, episode)
    assert call.prompt_ids == engine.requests[-1].token_ids
    # A legacy reply holds one call: generation ended where it closed, as with parallel_tool_calls off.
    assert qwen.decode(call.completion_ids) == "Trying 3.\n" + CALL


def test_functions_are_shown_to_the_model_as_the_same_tools(served, qwen):
    say(served, qwen, "ok")
    as_functions, as_tools = prompts(
        served, qwen, {"messages": USER, "functions": FUNCTIONS}, {"messages": USER, "tools": [GUESS, HINT]}
    )
    assert as_functions == as_tools and '"name": "hint"' in qwen.decode(as_functions)


@pytest.mark.parametrize(
    ("function_call", "tool_choice"),
    [
        ("auto", "auto"),
        ("none", "none"),
        ({"name": "hint"}, {"type": "function", "function": {"name": "hint"}}),
    ],
)
def test_function_call_is_the_tool_choice_it_names(served, qwen, function_call, tool_choice):
    say(served, qwen, HINT_CALL)
    legacy, tools = prompts(
        served,
        qwen,
        {"messages": USER, "functions": FUNCTIONS, "function_call": function_call},
        {"messages": USER, "tools": [GUESS, HINT], "tool_choice": tool_choice, "parallel_tool_calls": False},
    )
    assert legacy == tools
    if function_call == "none":  # the functions are not shown, and the reply is not read for calls
        reply = client(served[0], start(served[0])["episode_id"]).chat.completions.create(
            model="p", messages=USER, functions=FUNCTIONS, function_call="none"
        )
        assert reply.choices[0].message.function_call is None and reply.choices[0].finish_reason == "stop"


def test_a_reply_holds_one_function_call_and_its_sample_ends_where_that_call_closes(served, qwen):
    server, _ = served
    say(served, qwen, CALL + "\n" + HINT_CALL)
    episode = start(server)
    reply = client(server, episode["episode_id"]).chat.completions.create(
        model="p", messages=USER, functions=FUNCTIONS
    )
    assert reply.choices[0].message.function_call.name == "guess"
    [call] = calls_of(server, episode)
    sampled = qwen.decode(call.completion_ids)
    assert "hint" not in sampled and sampled.startswith(CALL)  # the sample is the call the agent was given


def test_a_streamed_function_call_comes_as_delta_function_call(served, qwen):
    server, _ = served
    say(served, qwen, CALL)
    episode = start(server)
    chunks = list(
        client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, functions=FUNCTIONS, stream=True
        )
    )
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    name = "".join(d.function_call.name or "" for d in deltas if d.function_call)
    arguments = "".join(d.function_call.arguments or "" for d in deltas if d.function_call)
    assert name == "guess" and json.loads(arguments) == {"number": 3}
    assert not any(d.tool_calls for d in deltas) and chunks[-1].choices[0].finish_reason == "function_call"
    assert len(calls_of(server, episode)) == 1


def test_legacy_history_is_rendered_as_the_tool_turns_it_stands_for(served, qwen):
    """An agent that got a function_call sends it back with a role function result."""
    say(served, qwen, CALL)
    server, _ = served
    agent = client(server, start(server)["episode_id"])
    first = agent.chat.completions.create(model="p", messages=USER, functions=FUNCTIONS).choices[0].message
    say(served, qwen, "You win.")
    legacy_history = [
        *USER,
        first.model_dump(exclude_none=True),
        {"role": "function", "name": "guess", "content": "right"},
    ]
    tools_history = [
        *USER,
        {
            "role": "assistant",
            "content": first.content,
            "tool_calls": [{"id": "c1", "type": "function", "function": first.function_call.model_dump()}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "right"},
    ]
    legacy, tools = prompts(
        served,
        qwen,
        {"messages": legacy_history, "functions": FUNCTIONS},
        {"messages": tools_history, "tools": [GUESS, HINT], "parallel_tool_calls": False},
    )
    assert legacy == tools and "<tool_response>\nright\n</tool_response>" in qwen.decode(legacy)


@pytest.mark.parametrize(
    ("named", "fields"),
    [
        ("functions and tools are both set", {"functions": FUNCTIONS, "tools": [GUESS]}),
        (
            "function_call and tool_choice are both set",
            {"functions": FUNCTIONS, "function_call": "auto", "tool_choice": "auto"},
        ),
        ("function_call is set but the request has no functions", {"function_call": "auto"}),
        ("function_call='required'", {"functions": FUNCTIONS, "function_call": "required"}),
        ("functions\\[0\\] has no name", {"functions": [{"parameters": {}}]}),
        ("tool_choice names 'nope'", {"functions": FUNCTIONS, "function_call": {"name": "nope"}}),
        (
            "messages\\[1\\] \\(role function, name 'guess'\\) answers no function_call",
            {"messages": [*USER, {"role": "function", "name": "guess", "content": "x"}]},
        ),
    ],
)
def test_a_malformed_legacy_request_is_a_400_naming_it(served, named, fields):
    server, engine = served
    episode = start(server)
    asked = len(engine.requests)
    with pytest.raises(openai.BadRequestError, match=named):
        client(server, episode["episode_id"]).chat.completions.create(
            model="p", **{"messages": USER, **fields}
        )
    assert len(engine.requests) == asked and calls_of(server, episode) == []
