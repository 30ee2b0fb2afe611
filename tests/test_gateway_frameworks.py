"""Agents written with popular frameworks, installed from PyPI, run unchanged against the
gateway on loopback: the OpenAI Agents SDK (Responses API and chat completions, plain and
streamed) and LangChain's ChatOpenAI (tools, and the deprecated functions), each a tool-using
agent over a few turns, with every model call recorded token-exact. The model's replies are
scripted (a random tiny model would never call a tool); everything between the framework and
the engine is real."""

from __future__ import annotations

import asyncio
import json

import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import calls_of, serve, start

from forge.rollout.engines.protocol import GenerationResult

pytestmark = pytest.mark.slow
WIDE = {"max_new_tokens": 200, "max_context_tokens": 8192}
SCRIPT = [
    'I will guess.\n<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>',
    '<tool_call>\n{"name": "guess", "arguments": {"number": 5}}\n</tool_call>',
    "The number is 5.",
]


class ScriptEngine:
    """Replies with the next scripted text each call (through the per-token callback, as
    HFEngine does), so that a framework's agent plays a fixed tool-using conversation."""

    def __init__(self, tokenizer, replies: list[str]) -> None:
        self.replies = [
            tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for r in replies
        ]
        self.policy_version = 3
        self.temperature, self.top_p = 1.0, 1.0
        self.sent: list[list[int]] = []

    def generate(self, requests):
        results = []
        for request in requests:
            reply = list(self.replies[len(self.sent) % len(self.replies)])
            for end, token in enumerate(reply, 1):
                if request.on_token is not None and request.on_token(token, -0.25, []):
                    reply = reply[:end]
                    break
            self.sent.append(reply)
            results.append(
                GenerationResult(
                    reply, [-0.25] * len(reply), True, self.policy_version, len(request.token_ids)
                )
            )
        return results

    def load_weights(self, state_dict, version):
        self.policy_version = version

    def release(self, episode_id):
        pass


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return byte_level_tokenizer("qwen", tmp_path_factory.mktemp("qwen"))


def guess_number(number: int) -> str:
    """Guess the secret number; says higher, lower or correct."""
    return "correct" if number == 5 else "higher" if number < 5 else "lower"


def assert_recorded_token_exact(server, episode, engine, tokenizer) -> None:
    calls = calls_of(server, episode)
    assert len(calls) == len(engine.sent) == 3
    for call, sent in zip(calls, engine.sent, strict=True):
        assert call.completion_ids == sent and call.logprobs == [-0.25] * len(sent)
        assert call.policy_version == 3
    # Each later prompt extends with the calls and tool results the agent fed back.
    second, third = (tokenizer.decode(c.prompt_ids) for c in calls[1:])
    assert '"number": 3' in second and "higher" in second
    assert '"number": 5' in third and "correct" in third


@pytest.mark.parametrize("api", ["responses", "chat_completions"])
@pytest.mark.parametrize("streamed", [False, True])
def test_an_openai_agents_sdk_agent_plays_a_tool_using_episode(qwen, api, streamed):
    from agents import (
        Agent,
        OpenAIChatCompletionsModel,
        OpenAIResponsesModel,
        Runner,
        function_tool,
        set_tracing_disabled,
    )
    from openai import AsyncOpenAI

    set_tracing_disabled(True)
    engine = ScriptEngine(qwen, SCRIPT)
    guesses: list[int] = []

    @function_tool
    def guess(number: int) -> str:
        """Guess the secret number; says higher, lower or correct."""
        guesses.append(number)
        return guess_number(number)

    async def play(server, episode_id: str) -> str:
        client = AsyncOpenAI(base_url=server.base_url, api_key=episode_id, max_retries=0)
        model_class = OpenAIResponsesModel if api == "responses" else OpenAIChatCompletionsModel
        agent = Agent(
            name="guesser",
            instructions="Find the number with the guess tool.",
            tools=[guess],
            model=model_class(model="forge-policy", openai_client=client),
        )
        if streamed:
            run = Runner.run_streamed(agent, "Guess the number between 1 and 8.", max_turns=5)
            async for _ in run.stream_events():
                pass
        else:
            run = await Runner.run(agent, "Guess the number between 1 and 8.", max_turns=5)
        await client.close()
        return run.final_output

    with serve(engine, qwen, **WIDE) as server:
        episode = start(server)
        final = asyncio.run(play(server, episode["episode_id"]))
        assert_recorded_token_exact(server, episode, engine, qwen)
    assert guesses == [3, 5] and final == "The number is 5."


def test_a_langchain_chat_openai_agent_plays_a_tool_using_episode(qwen):
    from langchain_core.messages import HumanMessage, SystemMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    engine = ScriptEngine(qwen, SCRIPT)
    guess = tool(guess_number)
    with serve(engine, qwen, **WIDE) as server:
        episode = start(server)
        model = ChatOpenAI(
            model="forge-policy",
            base_url=server.base_url,
            api_key=episode["episode_id"],
            max_retries=0,
            temperature=0.7,
        ).bind_tools([guess])
        messages = [SystemMessage("Find the number with the tool."), HumanMessage("Guess between 1 and 8.")]
        for _ in range(5):
            reply = model.invoke(messages)
            messages.append(reply)
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                messages.append(ToolMessage(guess.invoke(call["args"]), tool_call_id=call["id"]))
        assert_recorded_token_exact(server, episode, engine, qwen)
    assert [
        json.loads(json.dumps(m.tool_calls[0]["args"])) for m in messages if getattr(m, "tool_calls", None)
    ] == [{"number": 3}, {"number": 5}]
    assert messages[-1].content == "The number is 5."


def test_a_langchain_legacy_functions_agent_plays_a_tool_using_episode(qwen):
    """The loop of LangChain's legacy OpenAI functions agents: `functions` bound to the model,
    the call read from `additional_kwargs["function_call"]`, its result sent back as a
    FunctionMessage (role function), streamed or not."""
    from langchain_core.messages import FunctionMessage, HumanMessage, SystemMessage
    from langchain_core.utils.function_calling import convert_to_openai_function
    from langchain_openai import ChatOpenAI

    engine = ScriptEngine(qwen, SCRIPT)
    with serve(engine, qwen, **WIDE) as server:
        episode = start(server)
        model = ChatOpenAI(
            model="forge-policy", base_url=server.base_url, api_key=episode["episode_id"], max_retries=0
        ).bind(functions=[convert_to_openai_function(guess_number)])
        messages = [
            SystemMessage("Find the number with the function."),
            HumanMessage("Guess between 1 and 8."),
        ]
        for turn in range(5):
            if turn == 1:  # streamed: the chunks added up, as LangChain's streaming agents do
                chunks = list(model.stream(messages))
                reply = chunks[0]
                for chunk in chunks[1:]:
                    reply = reply + chunk
            else:
                reply = model.invoke(messages)
            messages.append(reply)
            call = reply.additional_kwargs.get("function_call")
            if not call:
                break
            result = guess_number(**json.loads(call["arguments"]))
            messages.append(FunctionMessage(result, name=call["name"]))
        assert_recorded_token_exact(server, episode, engine, qwen)
    calls = [
        m.additional_kwargs["function_call"] for m in messages if m.additional_kwargs.get("function_call")
    ]
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [
        ("guess", {"number": 3}),
        ("guess", {"number": 5}),
    ]
    assert messages[-1].content == "The number is 5."


def test_a_langchain_react_style_stop_ends_the_reply_token_exact(qwen):
    from langchain_openai import ChatOpenAI

    engine = ScriptEngine(qwen, ["Thought: try 3\nAction: guess[3]\nObservation: made up"])
    with serve(engine, qwen, **WIDE) as server:
        episode = start(server)
        model = ChatOpenAI(
            model="forge-policy", base_url=server.base_url, api_key=episode["episode_id"], max_retries=0
        )
        reply = model.invoke("Guess.", stop=["\nObservation:"])
        streamed = "".join(chunk.content for chunk in model.stream("Guess.", stop=["\nObservation:"]))
        first, second = calls_of(server, episode)
    assert reply.content == streamed == "Thought: try 3\nAction: guess[3]"
    for call in (first, second):
        assert qwen.decode(call.completion_ids) == "Thought: try 3\nAction: guess[3]\nObservation:"


@pytest.mark.parametrize("streamed", [False, True])
def test_a_litellm_agent_plays_a_tool_using_episode(qwen, monkeypatch, streamed):
    """LiteLLM's OpenAI provider (`openai/<model>` at `api_base`) in a hand-written tool loop;
    streamed, the chunks are put back together with LiteLLM's own stream_chunk_builder."""
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # else it fetches its price list
    litellm = pytest.importorskip("litellm")
    from gateway_helpers import GUESS

    engine = ScriptEngine(qwen, SCRIPT)
    with serve(engine, qwen, **WIDE) as server:
        episode = start(server)
        route = {
            "model": "openai/forge-policy",
            "api_base": server.base_url,
            "api_key": episode["episode_id"],
        }
        messages = [{"role": "user", "content": "Guess the number between 1 and 8."}]
        for _ in range(5):
            if streamed:
                chunks = list(litellm.completion(messages=messages, tools=[GUESS], stream=True, **route))
                reply = litellm.stream_chunk_builder(chunks, messages=messages).choices[0].message
            else:
                reply = litellm.completion(messages=messages, tools=[GUESS], **route).choices[0].message
            messages.append(reply.model_dump(exclude_none=True))
            if not reply.tool_calls:
                break
            for call in reply.tool_calls:
                result = guess_number(**json.loads(call.function.arguments))
                messages.append({"role": "tool", "tool_call_id": call.id, "content": result})
        assert_recorded_token_exact(server, episode, engine, qwen)
    assert [m["content"] for m in messages if m["role"] == "tool"] == ["higher", "correct"]
    assert messages[-1]["content"] == "The number is 5."
