"""`/v1/responses`, the Responses API (the OpenAI Agents SDK's default): input items and
function tools translated to a chat call, run and recorded like one, and its reply as
output items (a message, function calls), whole or as the API's stream of events."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import Field

from forge.gateway.calls import CallRun, Choice
from forge.gateway.chat import chat_spec, check_parameters, logprobs_of
from forge.gateway.decoding import token_entry
from forge.gateway.episodes import EpisodeError
from forge.gateway.protocol import ChatCompletionRequest, OpenAIBody, refused_field, text_content
from forge.gateway.tool_parsers import ToolParser


class ResponsesRequest(OpenAIBody):
    model: str = ""
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_output_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: dict[str, Any] | None = None
    stream: bool = False
    previous_response_id: str | None = None
    conversation: Any = None
    store: bool | None = None
    user: str | None = None
    metadata: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    truncation: str | None = None  # "auto" would drop items when over the context; here that is a 400
    max_tool_calls: int | None = None  # counts built-in tool calls, which the gateway has none of
    stream_options: dict[str, Any] | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None

    def unsupported(self) -> str | None:
        """A field the gateway would otherwise ignore while it changes what was asked."""
        if self.background:
            return "background responses are not supported: the gateway keeps no responses; call without background"
        if self.prompt:
            return "prompt (a stored prompt template) is not supported: send instructions and input instead"
        if any(value is not None for value in (self.reasoning or {}).values()):
            return (
                "reasoning is not supported by the Forge gateway: the policy reasons as its chat template "
                "and training make it; leave reasoning unset"
            )
        return refused_field(self.model_extra)

    @property
    def logprobs(self) -> bool:
        return LOGPROBS in (self.include or []) or bool(self.top_logprobs)


LOGPROBS = "message.output_text.logprobs"  # the `include` entry that asks for logprobs


def _part_text(content: Any, where: str) -> str:
    try:
        return text_content(content)
    except ValueError as exc:
        raise EpisodeError(400, f"{where}: {exc}") from None


def input_items(body: ResponsesRequest) -> list[dict[str, Any]]:
    return [{"role": "user", "content": body.input}] if isinstance(body.input, str) else list(body.input)


def conversation(gateway: Any, episode_id: str, body: ResponsesRequest) -> list[dict[str, Any]]:
    """The items a response goes on from: those of `previous_response_id` (its input and
    output, kept for the episode's life) and then this request's input."""
    if body.conversation:
        raise EpisodeError(
            400,
            "conversation is not supported: continue with previous_response_id, or send the whole "
            "conversation as input",
        )
    if not body.previous_response_id:
        return input_items(body)
    kept = gateway.kept_responses.get(episode_id, {}).get(body.previous_response_id)
    if kept is None:
        raise EpisodeError(
            400,
            f"previous_response_id {body.previous_response_id!r} is not a stored response of this "
            "episode: the gateway keeps an episode's responses (made with store unset or true) until it "
            "ends; send the whole conversation as input instead",
            code="previous_response_not_found",
            param="previous_response_id",
        )
    return kept + input_items(body)


def keep(
    gateway: Any, episode_id: str, body: ResponsesRequest, ident: str, items: list, output: list
) -> None:
    """Keep a response's conversation for a later previous_response_id, unless store is false."""
    if body.store is not False:
        gateway.kept_responses.setdefault(episode_id, {})[ident] = items + output


def chat_messages(body: ResponsesRequest, items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The instructions and input items as chat messages: function calls join the
    assistant message before them, their outputs become tool messages. (A previous
    response's instructions are not carried over, as the API says.)"""
    messages: list[dict[str, Any]] = []
    called: set[str] = set()  # call_ids of the function_call items so far
    unanswered: dict[Any, str] = {}  # of those, the ones no output has answered yet: where each is
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    kept = len(items) - len(input_items(body))  # the previous_response_id chain's items come first
    for index, item in enumerate(items):
        kind = item.get("type", "message")
        where = f"input[{index - kept}]" if index >= kept else f"previous_response_id's item {index}"
        if kind == "message" and item.get("role", "user") not in ("user", "assistant", "system", "developer"):
            raise EpisodeError(
                400,
                f"{where}.role={item.get('role')!r}: use user, assistant, system or developer "
                "(a tool's result is a function_call_output item)",
            )
        elif kind == "message":
            messages.append(
                {"role": item.get("role", "user"), "content": _part_text(item.get("content"), where)}
            )
        elif kind == "function_call":
            called.add(item.get("call_id", ""))
            unanswered[item.get("call_id", "")] = where
            call = {
                "id": item.get("call_id", ""),
                "type": "function",
                "function": {"name": item.get("name", ""), "arguments": item.get("arguments") or "{}"},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            if item.get("call_id") not in called:
                raise EpisodeError(400, _unmatched_output(body, item.get("call_id"), where))
            unanswered.pop(item.get("call_id"), None)
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item.get("call_id", ""),
                    "content": _part_text(item.get("output"), f"{where}.output"),
                }
            )
        elif kind == "reasoning":
            continue  # this gateway's models write no separate reasoning items
        else:
            raise EpisodeError(
                400,
                f"{where}: input item type {kind!r} is not supported "
                "(message, function_call, function_call_output)",
            )
    if not messages:
        raise EpisodeError(400, "input is empty: give a string or a list of input items")
    if unanswered:  # the API's "No tool output found for function call ...", every id named
        ids = ", ".join(repr(call_id) for call_id in unanswered)
        raise EpisodeError(
            400,
            f"{next(iter(unanswered.values()))}: no tool output found for function call {ids}: each "
            "function_call item needs a function_call_output item with its call_id after it; send the "
            "call's output in this request's input",
            param="input",
        )
    return messages


def _unmatched_output(body: ResponsesRequest, call_id: Any, where: str) -> str:
    """The API's 400 for a tool result that answers no call, saying where calls were looked for."""
    looked = "this request's input" + (
        f" and the conversation of previous_response_id {body.previous_response_id!r}"
        if body.previous_response_id
        else " (no previous_response_id was given)"
    )
    return (
        f"{where}: no tool call found for function call output with call_id {call_id!r}: no "
        f"function_call item with that call_id comes before it in {looked}; send the function_call "
        "item the output answers, or continue from the response that made it with previous_response_id"
    )


def as_chat_request(body: ResponsesRequest, items: list[dict[str, Any]]) -> ChatCompletionRequest:
    tools = []
    for index, tool in enumerate(body.tools or []):
        if tool.get("type") != "function":
            raise EpisodeError(400, f"tool type {tool.get('type')!r} is not supported; give function tools")
        if not isinstance(tool.get("name"), str):
            shape = (
                "is in the chat completions API's shape (a `function` inside); the Responses API takes"
                if isinstance(tool.get("function"), dict)
                else "has no name: give"
            )
            raise EpisodeError(
                400,
                f'tools[{index}] {shape} {{"type": "function", "name": ..., "parameters": {{...}}}}',
                param=f"tools[{index}]",
            )
        check_parameters(tool.get("parameters"), f"tools[{index}].parameters")
        tools.append(
            {
                "type": "function",
                "function": {
                    "name": tool["name"],
                    "description": tool.get("description") or "",
                    "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
                },
            }
        )
    problem = body.unsupported()
    if problem:
        raise EpisodeError(400, problem)
    choice = body.tool_choice
    if isinstance(choice, dict) and choice.get("type") == "function":
        choice = {"type": "function", "function": {"name": choice.get("name")}}
    elif isinstance(choice, dict) and choice.get("type") == "allowed_tools":
        listed = [
            {"type": "function", "function": {"name": t.get("name")}}
            for t in choice.get("tools") or []
            if isinstance(t, dict)
        ]
        choice = {
            "type": "allowed_tools",
            "allowed_tools": {"mode": choice.get("mode", "auto"), "tools": listed},
        }
    text_format = (body.text or {}).get("format") or {"type": "text"}
    if text_format.get("type", "text") not in ("text", "json_object", "json_schema"):
        raise EpisodeError(
            400, f"text.format.type={text_format.get('type')!r}: use text, json_object or json_schema"
        )
    return ChatCompletionRequest(
        model=body.model,
        messages=chat_messages(body, items),
        tools=tools or None,
        tool_choice=choice,
        parallel_tool_calls=body.parallel_tool_calls,
        max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stream=body.stream,
        user=body.user,
        response_format={"type": text_format.get("type", "text")},
        logprobs=body.logprobs,
        top_logprobs=body.top_logprobs,
    )


def _logprobs(gateway: Any, body: ResponsesRequest, choice: Choice) -> list[dict[str, Any]] | None:
    """Every recorded token's behaviour logprob (the end-of-turn token too, as chat gives
    them), when `include` or `top_logprobs` asks."""
    return logprobs_of(gateway, choice)["content"] if body.logprobs else None


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _output(
    choice: Choice, parser: ToolParser | None, parallel: bool, logprobs: list[dict[str, Any]] | None = None
) -> list[dict[str, Any]]:
    """The reply as output items; `logprobs` (every recorded token's, when asked) go on its text."""
    content, tool_calls = parser.split(choice.text) if parser is not None else (choice.text, [])
    if not parallel:
        tool_calls = tool_calls[:1]
    items: list[dict[str, Any]] = []
    if content:
        items.append(
            {
                "type": "message",
                "id": _id("msg"),
                "status": "completed",
                "role": "assistant",
                "content": [
                    {"type": "output_text", "text": content, "annotations": [], "logprobs": logprobs or []}
                ],
            }
        )
    for call in tool_calls:
        items.append(
            {
                "type": "function_call",
                "id": _id("fc"),
                "call_id": call["id"],
                "name": call["function"]["name"],
                "arguments": call["function"]["arguments"],
                "status": "completed",
            }
        )
    return items


def response_object(
    gateway: Any,
    body: ResponsesRequest,
    ident: str,
    created: int,
    status: str,
    output: list[dict[str, Any]],
    prompt_tokens: int,
    choice: Choice | None,
) -> dict[str, Any]:
    completion = len(choice.record.completion_ids) if choice is not None else 0
    cut = choice is not None and not choice.record.finished
    return {
        "id": ident,
        "object": "response",
        "created_at": created,
        "model": body.model or gateway.model_name,
        "status": "incomplete" if cut and status == "completed" else status,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "error": None,
        "instructions": body.instructions,
        "metadata": body.metadata or {},
        "output": output,
        "parallel_tool_calls": body.parallel_tool_calls is not False,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "tool_choice": body.tool_choice or "auto",
        "tools": body.tools or [],
        "max_output_tokens": body.max_output_tokens,
        "text": body.text or {"format": {"type": "text"}},
        "truncation": "disabled",
        "store": body.store is not False,
        "previous_response_id": body.previous_response_id,
        "reasoning": None,
        "usage": {
            "input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
            "output_tokens": completion,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion,
        },
    }


class EventSequence:
    """The stream's events as SSE text, numbered in order (`sequence_number` from 0)."""

    def __init__(self) -> None:
        self.sent = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        self.sent += 1
        data = json.dumps({"type": kind, "sequence_number": self.sent - 1, **fields})
        return f"event: {kind}\ndata: {data}\n\n"


async def response_stream(
    gateway: Any,
    body: ResponsesRequest,
    run: CallRun,
    parser: ToolParser | None,
    ident: str,
    kept: Callable[[list[dict[str, Any]]], None],
    event: EventSequence,
    created: int,
) -> AsyncIterator[str]:
    """The Responses stream: created, text deltas as tokens are sampled, function calls
    whole at the end, completed. `kept` is given the output to keep."""
    prompt_tokens = len(run.spec.prompt_ids)
    shell = response_object(gateway, body, ident, created, "in_progress", [], prompt_tokens, None)
    yield event("response.created", response=shell)
    yield event("response.in_progress", response=shell)
    message_id, opened = _id("msg"), False

    def open_message() -> list[str]:
        item = {
            "type": "message",
            "id": message_id,
            "status": "in_progress",
            "role": "assistant",
            "content": [],
        }
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [
            event("response.output_item.added", output_index=0, item=item),
            event(
                "response.content_part.added", item_id=message_id, output_index=0, content_index=0, part=part
            ),
        ]

    pending: list[dict[str, Any]] = []  # logprobs of tokens sampled since the last delta

    def on_token(token_event: Any) -> str | None:
        nonlocal opened, pending
        if body.logprobs:
            pending.append(
                token_entry(gateway.tokenizer, token_event.token_id, token_event.logprob, token_event.top)
            )
        if not token_event.text:
            return None
        pieces = [] if opened else open_message()
        opened = True
        pieces.append(
            event(
                "response.output_text.delta",
                item_id=message_id,
                output_index=0,
                content_index=0,
                delta=token_event.text,
                logprobs=pending,
            )
        )
        pending = []
        return "".join(pieces)

    streamed = gateway.stream_events(run, on_token)
    async for piece in streamed:
        yield piece
    [choice] = streamed.result
    output = _output(choice, parser, body.parallel_tool_calls is not False, _logprobs(gateway, body, choice))
    message = next((item for item in output if item["type"] == "message"), None)
    if message is not None:
        message["id"] = message_id
        text = message["content"][0]["text"]
        sent = choice.text[: run.texts[0].sent]
        if not opened:
            yield "".join(open_message())
        if text.startswith(sent) and len(text) > len(sent):
            yield event(
                "response.output_text.delta",
                item_id=message_id,
                output_index=0,
                content_index=0,
                delta=text[len(sent) :],
                logprobs=pending,
            )
        yield event(
            "response.output_text.done",
            item_id=message_id,
            output_index=0,
            content_index=0,
            text=text,
            logprobs=message["content"][0]["logprobs"],
        )
        yield event(
            "response.content_part.done",
            item_id=message_id,
            output_index=0,
            content_index=0,
            part=message["content"][0],
        )
        yield event("response.output_item.done", output_index=0, item=message)
    for index, item in enumerate(output):
        if item["type"] != "function_call":
            continue
        yield event(
            "response.output_item.added",
            output_index=index,
            item={**item, "arguments": "", "status": "in_progress"},
        )
        yield event(
            "response.function_call_arguments.delta",
            item_id=item["id"],
            output_index=index,
            delta=item["arguments"],
        )
        yield event(
            "response.function_call_arguments.done",
            item_id=item["id"],
            output_index=index,
            name=item["name"],
            arguments=item["arguments"],
        )
        yield event("response.output_item.done", output_index=index, item=item)
    kept(output)
    final = response_object(gateway, body, ident, created, "completed", output, prompt_tokens, choice)
    yield event(
        "response.completed" if final["status"] == "completed" else "response.incomplete", response=final
    )


async def failing_stream(
    stream: AsyncIterator[str], event: EventSequence, failed: Callable[[dict[str, Any]], dict[str, Any]]
) -> AsyncIterator[str]:
    """A Responses stream whose call fails after the headers went out ends as the API's
    own does: an `error` event (code, message, param), then `response.failed` carrying the
    response with its `error` set (`failed` makes it from that error)."""
    try:
        async for piece in stream:
            yield piece
    except Exception as exc:
        if isinstance(exc, EpisodeError):
            message, status = exc.message, exc.status
        else:  # a fault of the gateway itself: still a well-formed end, not a torn connection
            message, status = f"internal error: {type(exc).__name__}: {exc}", 500
        # OpenAI's ResponseError codes name server faults "server_error"; a refusal keeps its kind.
        code = "server_error" if status >= 500 else "invalid_request_error"
        yield event("error", code=code, message=message, param=None)
        yield event("response.failed", response=failed({"code": code, "message": message}))


def mount_responses(app: FastAPI, gateway: Any) -> None:
    """Add `POST /v1/responses` to the gateway's app, and say on the routes of stored
    responses (retrieve, delete, cancel, input items) that none can be read back."""

    @app.api_route("/v1/responses/{response_id}", methods=["GET", "DELETE"])
    @app.api_route("/v1/responses/{response_id}/input_items", methods=["GET"])
    @app.api_route("/v1/responses/{response_id}/cancel", methods=["POST"])
    async def stored_response(response_id: str):
        raise EpisodeError(
            404,
            f"response {response_id!r} cannot be read back: the Forge gateway stores no responses to "
            "retrieve (each call is recorded for training; an episode's responses are kept only to go on "
            "from with previous_response_id); keep what you need from the reply itself",
        )

    @app.post("/v1/responses")
    async def responses(body: ResponsesRequest, request: Request):
        episode_id = gateway.resolve_episode(request, body.user)
        gateway.store.live(episode_id)  # a finished episode says so, before its responses are looked up
        items = conversation(gateway, episode_id, body)
        chat = as_chat_request(body, items)
        spec, parser = chat_spec(gateway, chat, "max_output_tokens")
        headers = gateway.apply_sampling(chat, spec)
        run = gateway.start_call(episode_id, spec, body.stream)
        ident = _id("resp")
        if body.stream:
            event, created = EventSequence(), int(time.time())
            stream = response_stream(
                gateway,
                body,
                run,
                parser,
                ident,
                lambda output: keep(gateway, episode_id, body, ident, items, output),
                event,
                created,
            )

            def failed(error: dict[str, Any]) -> dict[str, Any]:
                response = response_object(
                    gateway, body, ident, created, "failed", [], len(spec.prompt_ids), None
                )
                return {**response, "error": error}

            return StreamingResponse(
                failing_stream(stream, event, failed), media_type="text/event-stream", headers=headers
            )
        [choice] = await gateway.finish_call(request, run)
        output = _output(
            choice, parser, body.parallel_tool_calls is not False, _logprobs(gateway, body, choice)
        )
        keep(gateway, episode_id, body, ident, items, output)
        body_out = response_object(
            gateway, body, ident, int(time.time()), "completed", output, len(spec.prompt_ids), choice
        )
        return JSONResponse(body_out, headers=headers)
