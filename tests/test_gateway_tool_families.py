"""Tool calls per model family, each with its chat template's real shape on a tiny
byte-level tokenizer: Hermes / Qwen, Llama 3 JSON and Mistral. The family is read from the
template (or set by `gateway.tool_parser`); calls come back as OpenAI `tool_calls` and go
back into the next prompt through the same template."""

from __future__ import annotations

import json

import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import GUESS, HINT, ScriptedEngine, calls_of, client, serve, start

from forge.gateway.tool_parsers import choose_tool_parser

WIDE = {"max_new_tokens": 300, "max_context_tokens": 8192}
USER = [{"role": "user", "content": "Guess a number."}]

# family: (parser it is read as, a reply with two calls in its format, how the template
# writes the first call back into the next prompt)
FAMILIES = {
    "qwen": (
        "hermes",
        '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>\n'
        '<tool_call>\n{"name": "hint", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>',
    ),
    "llama3": (
        "llama3_json",
        '<|python_tag|>{"name": "guess", "parameters": {"number": 3}}; {"name": "hint", "parameters": {}}',
        '{"name": "guess", "parameters": {"number": 3}}',
    ),
    "mistral": (
        "mistral",
        '[TOOL_CALLS][{"name": "guess", "arguments": {"number": 3}}, {"name": "hint", "arguments": {}}]',
        '[TOOL_CALLS] [{"name": "guess", "arguments": {"number": 3}, "id": "',
    ),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    return request.param, byte_level_tokenizer(request.param, tmp_path_factory.mktemp(request.param))


def scripted(tokenizer, text: str) -> ScriptedEngine:
    return ScriptedEngine(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def test_the_parser_is_read_from_the_chat_template(family):
    name, tokenizer = family
    assert choose_tool_parser(tokenizer).name == FAMILIES[name][0]


def test_the_familys_calls_come_back_as_openai_tool_calls_and_go_back_into_the_prompt(family):
    name, tokenizer = family
    _, reply_text, written_back = FAMILIES[name]
    with serve(scripted(tokenizer, reply_text), tokenizer, **WIDE) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        first = agent.chat.completions.create(model="p", messages=USER, tools=[GUESS, HINT])
        message = first.choices[0].message
        messages = [
            *USER,
            message.model_dump(exclude_none=True),
            *({"role": "tool", "tool_call_id": call.id, "content": "higher"} for call in message.tool_calls),
        ]
        agent.chat.completions.create(model="p", messages=messages, tools=[GUESS, HINT])
        first_call, second_call = calls_of(server, episode)
    assert first.choices[0].finish_reason == "tool_calls" and message.content is None
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("guess", {"number": 3}),
        ("hint", {}),
    ]
    if name == "mistral":  # Mistral's template refuses other ids
        assert all(len(c.id) == 9 and c.id.isalnum() for c in message.tool_calls)
    # The sample is the model's own tokens, marker included.
    assert tokenizer.decode(first_call.completion_ids, skip_special_tokens=False).startswith(reply_text)
    rendered = tokenizer.decode(second_call.prompt_ids, skip_special_tokens=False)
    assert written_back in rendered and "higher" in rendered


def test_a_required_tool_choice_opens_the_familys_call(family):
    name, tokenizer = family
    parser = choose_tool_parser(tokenizer)
    rest = {
        "hermes": 'hint", "arguments": {}}\n</tool_call>',
        "llama3_json": 'hint", "parameters": {}}',
        "mistral": 'hint", "arguments": {}}]',
    }[parser.name]
    with serve(scripted(tokenizer, rest), tokenizer, **WIDE) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, tools=[GUESS, HINT], tool_choice="required"
        )
        [call] = calls_of(server, episode)
    [tool_call] = reply.choices[0].message.tool_calls
    assert tool_call.function.name == "hint"
    assert tokenizer.decode(call.prompt_ids, skip_special_tokens=False).endswith(parser.opening(None))


def test_a_streamed_family_call_holds_its_text_back(family):
    name, tokenizer = family
    with serve(scripted(tokenizer, FAMILIES[name][1]), tokenizer, **WIDE) as server:
        episode = start(server)
        chunks = list(
            client(server, episode["episode_id"]).chat.completions.create(
                model="p", messages=USER, tools=[GUESS, HINT], stream=True
            )
        )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ""
    names = [d.function.name for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert names == ["guess", "hint"]


@pytest.mark.parametrize("stream", [False, True])
def test_without_parallel_tool_calls_generation_ends_after_the_first_call(family, stream):
    """The agent is given one call, so the sample must hold only that call: the model's
    second call is never generated (it was recorded, unseen by the agent, before)."""
    name, tokenizer = family
    reply_text = FAMILIES[name][1]
    engine = scripted(tokenizer, reply_text)
    with serve(engine, tokenizer, **WIDE) as server:
        episode = start(server)
        asked = {"model": "p", "messages": USER, "tools": [GUESS, HINT], "parallel_tool_calls": False}
        agent = client(server, episode["episode_id"])
        if stream:
            chunks = list(agent.chat.completions.create(**asked, stream=True))
            calls = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
            reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        else:
            choice = agent.chat.completions.create(**asked).choices[0]
            calls, reason = choice.message.tool_calls, choice.finish_reason
        [call] = calls_of(server, episode)
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("guess", {"number": 3})]
    assert reason == "tool_calls"
    sampled = tokenizer.decode(call.completion_ids, skip_special_tokens=False)
    assert "hint" not in sampled and reply_text.startswith(sampled) and "guess" in sampled
    assert engine.generated[-1] == len(call.completion_ids) < len(engine.reply)
    assert call.finished


def test_the_setting_overrides_the_template(tmp_path):
    tokenizer = byte_level_tokenizer("llama3", tmp_path)
    text = '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>'
    with serve(scripted(tokenizer, text), tokenizer, tool_parser="hermes", **WIDE) as server:
        episode = start(server)
        reply = client(server, episode["episode_id"]).chat.completions.create(
            model="p", messages=USER, tools=[GUESS]
        )
    assert reply.choices[0].message.tool_calls[0].function.name == "guess"


def test_an_unknown_parser_setting_names_the_choices(tmp_path):
    with pytest.raises(ValueError, match="use auto, hermes, llama3_json, mistral"):
        choose_tool_parser(byte_level_tokenizer("qwen", tmp_path), "xml")


def test_a_legacy_function_call_comes_back_as_one_call_and_goes_back_into_the_familys_prompt(family):
    """The deprecated `functions`: the reply's first call as `message.function_call` (the
    sample ends where it closes), and sent back with a role function result, written into
    the next prompt as the family's template writes a tool call and its result."""
    name, tokenizer = family
    _, reply_text, written_back = FAMILIES[name]
    functions = [GUESS["function"], HINT["function"]]
    with serve(scripted(tokenizer, reply_text), tokenizer, **WIDE) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        first = agent.chat.completions.create(model="p", messages=USER, functions=functions)
        message = first.choices[0].message
        messages = [
            *USER,
            message.model_dump(exclude_none=True),
            {"role": "function", "name": message.function_call.name, "content": "higher"},
        ]
        agent.chat.completions.create(model="p", messages=messages, functions=functions)
        first_call, second_call = calls_of(server, episode)
    assert first.choices[0].finish_reason == "function_call" and message.tool_calls is None
    assert (message.function_call.name, json.loads(message.function_call.arguments)) == (
        "guess",
        {"number": 3},
    )
    assert "hint" not in tokenizer.decode(first_call.completion_ids, skip_special_tokens=False)
    rendered = tokenizer.decode(second_call.prompt_ids, skip_special_tokens=False)
    assert written_back in rendered and "higher" in rendered
