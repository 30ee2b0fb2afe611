"""`/v1/responses` through the real `openai` SDK: text and function tools, whole and
streamed, each call recorded as a sample."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest
from family_tokenizers import byte_level_tokenizer
from gateway_helpers import ScriptedEngine, async_client, calls_of, client, serve, start

WIDE = {"max_new_tokens": 200, "max_context_tokens": 4096}
GUESS = {
    "type": "function",
    "name": "guess",
    "description": "Guess the number.",
    "parameters": {"type": "object", "properties": {"number": {"type": "integer"}}, "required": ["number"]},
}
CALL_TEXT = 'Trying 3.\n<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>'


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return byte_level_tokenizer("qwen", tmp_path_factory.mktemp("qwen"))


def scripted(tokenizer, text: str) -> ScriptedEngine:
    return ScriptedEngine(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])


def test_a_text_response_is_the_recorded_reply(qwen):
    with serve(scripted(qwen, "The number is 3."), qwen, **WIDE) as server:
        episode = start(server)
        response = client(server, episode["episode_id"]).responses.create(
            model="p", instructions="Be brief.", input="Which number?"
        )
        [call] = calls_of(server, episode)
    assert response.output_text == "The number is 3." and response.status == "completed"
    assert response.usage.output_tokens == len(call.completion_ids)
    prompt = qwen.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Which number?"}],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert call.prompt_ids == qwen(prompt, add_special_tokens=False)["input_ids"]


def test_function_tools_round_trip_through_input_items(qwen):
    with serve(scripted(qwen, CALL_TEXT), qwen, **WIDE) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        first = agent.responses.create(model="p", input="Guess.", tools=[GUESS])
        [message, function_call] = first.output
        followup = [
            {"role": "user", "content": "Guess."},
            *[item.model_dump(exclude_none=True) for item in first.output],
            {"type": "function_call_output", "call_id": function_call.call_id, "output": "higher"},
        ]
        agent.responses.create(model="p", input=followup, tools=[GUESS])
        _, second = calls_of(server, episode)
    assert message.content[0].text == "Trying 3."
    assert function_call.name == "guess" and json.loads(function_call.arguments) == {"number": 3}
    rendered = qwen.decode(second.prompt_ids)
    assert '<tool_call>\n{"name": "guess", "arguments": {"number": 3}}\n</tool_call>' in rendered
    assert "<tool_response>\nhigher\n</tool_response>" in rendered


def test_a_streamed_response_sends_deltas_then_the_completed_response(qwen):
    async def play(server, episode_id):
        agent = async_client(server, episode_id)
        stream = await agent.responses.create(model="p", input="Guess.", tools=[GUESS], stream=True)
        events = [event async for event in stream]
        await agent.close()
        return events

    with serve(scripted(qwen, CALL_TEXT), qwen, **WIDE) as server:
        episode = start(server)
        events = asyncio.run(play(server, episode["episode_id"]))
        [call] = calls_of(server, episode)
    kinds = [event.type for event in events]
    assert kinds[:2] == ["response.created", "response.in_progress"] and kinds[-1] == "response.completed"
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == "Trying 3."
    [arguments] = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
    assert json.loads(arguments) == {"number": 3}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert events[-1].response.usage.output_tokens == len(call.completion_ids)


def test_a_response_cut_by_max_output_tokens_is_incomplete(qwen):
    with serve(scripted(qwen, "a long reply that goes on"), qwen, **WIDE) as server:
        episode = start(server)
        response = client(server, episode["episode_id"]).responses.create(
            model="p", input="x", max_output_tokens=4
        )
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"


def test_unsupported_inputs_are_refused_by_name(qwen):
    with serve(scripted(qwen, "x"), qwen, **WIDE) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        with pytest.raises(openai.BadRequestError, match="web_search"):
            agent.responses.create(model="p", input="x", tools=[{"type": "web_search"}])
        with pytest.raises(openai.BadRequestError, match="previous_response_id"):
            agent.responses.create(model="p", input="x", previous_response_id="resp_1")


@pytest.mark.parametrize("stream", [False, True])
def test_previous_response_id_goes_on_from_the_kept_conversation(qwen, stream):
    engine = scripted(qwen, CALL_TEXT)
    with serve(engine, qwen, **WIDE) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])

        def respond(**fields):
            if not stream:
                return agent.responses.create(model="p", tools=[GUESS], **fields)
            return list(agent.responses.create(model="p", tools=[GUESS], stream=True, **fields))[-1].response

        first = respond(instructions="Play.", input="Guess.")
        [_, function_call] = first.output
        engine.reply = qwen("Higher, then 5.", add_special_tokens=False)["input_ids"] + [qwen.eos_token_id]
        output = {"type": "function_call_output", "call_id": function_call.call_id, "output": "higher"}
        second = respond(previous_response_id=first.id, input=[output])
        third = respond(previous_response_id=second.id, input="And now?")
        _, second_call, third_call = calls_of(server, episode)
        with pytest.raises(openai.BadRequestError, match="store"):
            unkept = respond(input="x", store=False)
            respond(previous_response_id=unkept.id, input="y")
        kept = server.gateway.kept_responses
        assert set(kept[episode["episode_id"]]) == {first.id, second.id, third.id}
        httpx.post(f"{server.root_url}/forge/episodes/{episode['episode_id']}/finish", json={"reward": 1.0})
        assert episode["episode_id"] not in kept  # an episode's responses go when it ends
        with pytest.raises(openai.ConflictError, match="already finished"):
            respond(previous_response_id=third.id, input="more")
    assert first.store and second.previous_response_id == first.id
    second_prompt = qwen.decode(second_call.prompt_ids)
    # The first call's instructions are not carried over (as the API says); its turns are.
    assert "Play." not in second_prompt
    assert '"name": "guess", "arguments": {"number": 3}' in second_prompt
    assert "<tool_response>\nhigher\n</tool_response>" in second_prompt
    third_prompt = qwen.decode(third_call.prompt_ids)
    assert (
        third_prompt.startswith(second_prompt)
        and "Higher, then 5." in third_prompt
        and "And now?" in third_prompt
    )


def test_previous_response_id_of_another_episode_is_refused(qwen):
    with serve(scripted(qwen, "x"), qwen, **WIDE) as server:
        first = client(server, start(server)["episode_id"]).responses.create(model="p", input="x")
        other = client(server, start(server, task_id="t1")["episode_id"])
        with pytest.raises(openai.BadRequestError, match="not a stored response of this episode") as raised:
            other.responses.create(model="p", input="y", previous_response_id=first.id)
    # OpenAI's code and param, by which clients (Codex and its proxies) resend the whole input.
    assert (raised.value.code, raised.value.param) == ("previous_response_not_found", "previous_response_id")


class FailingMidway(ScriptedEngine):
    """Streams its first tokens, then the device fails."""

    def generate(self, requests):
        for request in requests:
            for token in self.reply[:3]:
                request.on_token(token, -0.5, [])
        raise RuntimeError("the device fell over")


FAILED = "generation failed: RuntimeError: the device fell over"


def test_a_stream_that_fails_midway_ends_with_the_apis_error_and_failed_events(qwen):
    engine = FailingMidway(qwen("Trying 3.", add_special_tokens=False)["input_ids"])
    with serve(engine, qwen, **WIDE) as server:
        episode = start(server)
        agent = client(server, episode["episode_id"])
        events = list(agent.responses.create(model="p", input="Guess.", stream=True))
        with agent.responses.stream(model="p", input="Guess.") as stream:
            seen = list(stream)
            with pytest.raises(RuntimeError, match="response.completed"):
                stream.get_final_response()
        assert calls_of(server, episode) == []  # a failed call is no sample
    # The SDK parses both as its own types (a chat-style {"error": ...} event raised APIError instead).
    assert [type(e).__name__ for e in events[-2:]] == ["ResponseErrorEvent", "ResponseFailedEvent"]
    error, failed = events[-2:]
    assert "response.output_text.delta" in [e.type for e in events]  # it failed after text went out
    assert (error.type, error.code, error.message, error.param) == ("error", "server_error", FAILED, None)
    assert failed.response.status == "failed" and failed.response.error.message == FAILED
    assert failed.response.error.code == "server_error" and failed.response.id == events[0].response.id
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in seen[-2:]] == ["error", "response.failed"] and seen[-2].message == FAILED
