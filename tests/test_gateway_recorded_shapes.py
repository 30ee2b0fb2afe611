"""The exact requests agent frameworks send, recorded from LangChain's `ChatOpenAI`
(structured output both ways, a ReAct stop, a legacy `functions` agent and its history), the
OpenAI Agents SDK (ModelSettings with a required tool, parallel calls off, store, metadata and
top_p; an `output_type`; both over the Responses API and chat completions) and LiteLLM (`litellm.completion`, plain and
streamed), replayed with raw httpx: every reply parses as the `openai` SDK's own type, says
what the framework reads, and is recorded once. The frameworks themselves are not CI
dependencies; `tests/test_gateway_frameworks.py` runs two of them end to end."""

from __future__ import annotations

import json

import httpx
import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import ScriptedEngine, calls_of, serve, start
from openai.types.chat import ChatCompletion, ChatCompletionChunk
from openai.types.responses import Response

WIDE = {"max_new_tokens": 200, "max_context_tokens": 4096}
SCHEMA = {
    "properties": {"number": {"title": "Number", "type": "integer"}},
    "required": ["number"],
    "title": "Guess",
    "type": "object",
    "additionalProperties": False,
}
GUESS_PARAMETERS = {**SCHEMA, "title": "guess_args"}
CALL = '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>'
AGENT_SETTINGS = {"metadata": {"run": "a"}, "parallel_tool_calls": False, "store": False, "top_p": 0.9}

# What LangChain's convert_to_openai_function makes of a `guess(number: int)` function.
LEGACY_GUESS = {
    "name": "guess",
    "description": "Guess the number.",
    "parameters": {"properties": {"number": {"type": "integer"}}, "required": ["number"], "type": "object"},
}
HINT_TOOL = {
    "name": "hint",
    "parameters": {
        "properties": {},
        "title": "hint_args",
        "type": "object",
        "additionalProperties": False,
        "required": [],
    },
    "strict": True,
    "type": "function",
    "description": "A hint.",
}
OUTPUT_TYPE = {"type": "json_schema", "name": "final_output", "schema": SCHEMA, "strict": True}
HINT_CALL = '<tool_call>\n{"name": "hint", "arguments": {}}\n</tool_call>'
# An Agents SDK agent with tools and an output_type asks for both at once.
AGENT_WITH_TOOLS_AND_OUTPUT_TYPE = {
    "/v1/responses": {
        "model": "p",
        "include": [],
        "input": [{"content": "go", "role": "user"}],
        "instructions": "Answer.",
        "text": {"format": OUTPUT_TYPE},
        "tools": [HINT_TOOL],
    },
    "/v1/chat/completions": {
        "model": "p",
        "messages": [{"content": "Answer.", "role": "system"}, {"role": "user", "content": "go"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "final_output", "strict": True, "schema": SCHEMA},
        },
        "tools": [
            {
                "type": "function",
                "function": {key: HINT_TOOL[key] for key in ("name", "description", "parameters", "strict")},
            }
        ],
    },
}

# (who sends it, route, body, what the model writes, what the reply must say)
SHAPES = [
    (
        "langchain with_structured_output (json_schema)",
        "/v1/chat/completions",
        {
            "model": "p",
            "stream": False,
            "messages": [{"content": "guess", "role": "user"}],
            "response_format": {
                "type": "json_schema",
                "json_schema": {"schema": SCHEMA, "name": "Guess", "strict": True},
            },
        },
        '"number": 3} and more',
        {"content": '{"number": 3}'},
    ),
    (
        "langchain with_structured_output(method='function_calling')",
        "/v1/chat/completions",
        {
            "model": "p",
            "stream": False,
            "messages": [{"content": "guess", "role": "user"}],
            "parallel_tool_calls": False,
            "tool_choice": {"type": "function", "function": {"name": "Guess"}},
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "Guess",
                        "description": "",
                        "parameters": {
                            "properties": {"number": {"type": "integer"}},
                            "required": ["number"],
                            "type": "object",
                        },
                    },
                }
            ],
        },
        # A second call the agent would never see: generation must end before it.
        '{"number": 3}}\n</tool_call>\n<tool_call>\n{"name": "Guess", "arguments": {"number": 4}}\n</tool_call>',
        {"tool_calls": [("Guess", {"number": 3})], "sampled_ends_with": "</tool_call>"},
    ),
    (
        "langchain bind(functions=..., function_call={'name': ...}) (a legacy functions agent)",
        "/v1/chat/completions",
        {
            "model": "p",
            "stream": False,
            "messages": [{"content": "Play.", "role": "system"}, {"content": "go", "role": "user"}],
            "function_call": {"name": "guess"},
            "functions": [LEGACY_GUESS],
        },
        # The reply holds one call: generation must end before a second.
        '{"number": 3}}\n</tool_call>\n<tool_call>\n{"name": "guess", "arguments": {}}\n</tool_call>',
        {"function_call": ("guess", {"number": 3}), "sampled_ends_with": "</tool_call>"},
    ),
    (
        "langchain legacy functions agent, the turn after a FunctionMessage",
        "/v1/chat/completions",
        {
            "model": "p",
            "stream": False,
            "messages": [
                {"content": "Play.", "role": "system"},
                {"content": "go", "role": "user"},
                {
                    "content": None,
                    "role": "assistant",
                    "function_call": {"arguments": '{"number": 3}', "name": "guess"},
                },
                {"content": "right", "name": "guess", "role": "function"},
            ],
            "functions": [LEGACY_GUESS],
        },
        "You win.",
        {"content": "You win.", "prompt_has": [CALL, "<tool_response>\nright\n</tool_response>"]},
    ),
    (
        "langchain bind(stop=...) ReAct",
        "/v1/chat/completions",
        {
            "model": "p",
            "stream": False,
            "messages": [{"content": "react", "role": "user"}],
            "stop": ["\nObservation:"],
        },
        "Thought: go\nObservation: never",
        {"content": "Thought: go"},
    ),
    (
        "agents sdk Responses, ModelSettings(tool_choice='required', parallel_tool_calls=False, ...)",
        "/v1/responses",
        {
            "model": "p",
            "include": [],
            "input": [{"content": "go", "role": "user"}],
            "instructions": "Play.",
            "tool_choice": "required",
            "tools": [
                {
                    "name": "guess",
                    "parameters": GUESS_PARAMETERS,
                    "strict": True,
                    "type": "function",
                    "description": "Guess the number.",
                }
            ],
            **AGENT_SETTINGS,
        },
        'guess", "arguments": {"number": 3}}\n</tool_call>',
        {"tool_calls": [("guess", {"number": 3})]},
    ),
    (
        "agents sdk Responses, the turn after the tool ran",
        "/v1/responses",
        {
            "model": "p",
            "include": [],
            "input": [
                {"content": "go", "role": "user"},
                {
                    "arguments": '{"number": 3}',
                    "call_id": "call_44d52b93ac1d3994",
                    "name": "guess",
                    "type": "function_call",
                    "id": "fc_9073f59657342c8c8cbb896a",
                    "status": "completed",
                },
                {"call_id": "call_44d52b93ac1d3994", "output": "right", "type": "function_call_output"},
            ],
            "instructions": "Play.",
            "tools": [
                {
                    "name": "guess",
                    "parameters": GUESS_PARAMETERS,
                    "strict": True,
                    "type": "function",
                    "description": "Guess the number.",
                }
            ],
            **AGENT_SETTINGS,
        },
        "You win.",
        {"content": "You win.", "prompt_has": ["<tool_response>\nright\n</tool_response>"]},
    ),
    (
        "agents sdk Responses, Agent(output_type=Guess)",
        "/v1/responses",
        {
            "model": "p",
            "include": [],
            "input": [{"content": "go", "role": "user"}],
            "instructions": "Answer.",
            "text": {
                "format": {"type": "json_schema", "name": "final_output", "schema": SCHEMA, "strict": True}
            },
            "tools": [],
        },
        '"number": 3}',
        {"content": '{"number": 3}'},
    ),
    (
        "agents sdk chat completions, ModelSettings(tool_choice='required', parallel_tool_calls=False, ...)",
        "/v1/chat/completions",
        {
            "model": "p",
            "messages": [{"content": "Play.", "role": "system"}, {"role": "user", "content": "go"}],
            "tool_choice": "required",
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "guess",
                        "description": "Guess the number.",
                        "parameters": GUESS_PARAMETERS,
                        "strict": True,
                    },
                }
            ],
            **AGENT_SETTINGS,
        },
        'guess", "arguments": {"number": 3}}\n</tool_call>',
        {"tool_calls": [("guess", {"number": 3})]},
    ),
    (
        "agents sdk chat completions, the turn after the tool ran",
        "/v1/chat/completions",
        {
            "model": "p",
            "messages": [
                {"content": "Play.", "role": "system"},
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "call_8837b5d87f26b409",
                            "type": "function",
                            "function": {"name": "guess", "arguments": '{"number": 3}'},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "call_8837b5d87f26b409", "content": "right"},
            ],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "guess",
                        "description": "Guess the number.",
                        "parameters": GUESS_PARAMETERS,
                        "strict": True,
                    },
                }
            ],
            **AGENT_SETTINGS,
        },
        "You win.",
        {"content": "You win.", "prompt_has": [CALL, "<tool_response>\nright\n</tool_response>"]},
    ),
    *[
        (
            f"agents sdk Agent(tools=[hint], output_type=Guess) over {route}, {what}",
            route,
            AGENT_WITH_TOOLS_AND_OUTPUT_TYPE[route],
            reply,
            expected,
        )
        for route in AGENT_WITH_TOOLS_AND_OUTPUT_TYPE
        for what, reply, expected in (
            # JSON mode must not take the model's tool calls away (it forced "{" before).
            (
                "calling the tool",
                HINT_CALL,
                # Nothing is forced after the prompt: the model chooses a call or an answer.
                {"tool_calls": [("hint", {})], "prompt_ends_with": "<|im_start|>assistant"},
            ),
            ("answering", '{"number": 3} and more', {"content": '{"number": 3}'}),
        )
    ],
    (
        "litellm.completion(stop=[...], max_tokens, temperature)",
        "/v1/chat/completions",
        {
            "model": "p",
            "messages": [{"role": "user", "content": "hi"}],
            "temperature": 0.3,
            "stop": ["world"],
            "max_tokens": 20,
        },
        "hello world",
        {"content": "hello "},
    ),
    (
        "litellm.completion(stream=True, stream_options={'include_usage': True})",
        "/v1/chat/completions",
        {
            "model": "p",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        "hello world",
        {"content": "hello world"},
    ),
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    qwen = byte_level_tokenizer("qwen", tmp_path_factory.mktemp("qwen"))
    engine = ScriptedEngine([])
    with serve(engine, qwen, **WIDE) as server:
        yield server, engine, qwen


def _read(route: str, response: httpx.Response) -> tuple[str | None, list[tuple[str, dict]], int | None]:
    """The reply's content, tool calls and usage, read through the openai SDK's own types."""
    if route == "/v1/responses":
        reply = Response.model_validate(response.json())
        calls = [
            (item.name, json.loads(item.arguments)) for item in reply.output if item.type == "function_call"
        ]
        return reply.output_text or None, calls, reply.usage.output_tokens
    if response.headers["content-type"].startswith("text/event-stream"):
        lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [ChatCompletionChunk.model_validate(json.loads(line)) for line in lines[:-1]]
        content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        return content, [], chunks[-1].usage.completion_tokens
    reply = ChatCompletion.model_validate(response.json())
    message = reply.choices[0].message
    calls = [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls or []]
    if message.function_call is not None:  # the deprecated form: one call, and no tool_calls
        assert not calls and reply.choices[0].finish_reason == "function_call"
        calls = [("function_call", message.function_call.name, json.loads(message.function_call.arguments))]
    return message.content, calls, reply.usage.completion_tokens


@pytest.mark.parametrize(("who", "route", "body", "reply", "expected"), SHAPES, ids=[s[0] for s in SHAPES])
def test_a_frameworks_recorded_request_gets_the_reply_it_reads(served, who, route, body, reply, expected):
    server, engine, qwen = served
    engine.reply = qwen(reply, add_special_tokens=False)["input_ids"] + [qwen.eos_token_id]
    episode = start(server)
    response = httpx.post(
        server.root_url + route, json=body, headers={"Authorization": f"Bearer {episode['episode_id']}"}
    )
    assert response.status_code == 200, response.text
    content, tool_calls, completion_tokens = _read(route, response)
    [call] = calls_of(server, episode)
    assert completion_tokens == len(call.completion_ids)
    if "content" in expected:
        assert content == expected["content"]
    legacy = [("function_call", *expected["function_call"])] if "function_call" in expected else []
    assert tool_calls == expected.get("tool_calls", legacy)
    sampled = qwen.decode(call.completion_ids, skip_special_tokens=False)
    assert sampled.endswith(expected.get("sampled_ends_with", sampled))
    prompt = qwen.decode(call.prompt_ids, skip_special_tokens=False)
    assert all(text in prompt for text in expected.get("prompt_has", []))
    assert prompt.endswith(expected.get("prompt_ends_with", ""))
