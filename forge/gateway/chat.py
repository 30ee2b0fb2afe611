"""`/v1/chat/completions`: a request as a `CallSpec` (template, tools, tool_choice,
response_format, stop, limits, sampling), and its choices as an OpenAI reply or a stream
of chunks sent token by token."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from forge.gateway.calls import CallRun, CallSpec, Choice, TokenEvent
from forge.gateway.decoding import JsonObjectEnd, LeadingObjectEnd, token_entry
from forge.gateway.episodes import EpisodeError
from forge.gateway.legacy import FINISH_REASON as LEGACY_FINISH
from forge.gateway.legacy import legacy_message
from forge.gateway.protocol import ChatCompletionRequest, completion_id, finish_reason, now
from forge.gateway.tool_parsers import ToolParser


def tool_choice_function(body: ChatCompletionRequest) -> str | None:
    """The function a `tool_choice` names ({"type": "function", "function": {"name": ...}})."""
    choice = body.tool_choice
    if isinstance(choice, dict):
        name = (choice.get("function") or {}).get("name") or choice.get("name")
        if not isinstance(name, str):
            raise EpisodeError(
                400,
                'tool_choice must be "none", "auto", "required", {"type": "function", "function": '
                '{"name": ...}} or {"type": "allowed_tools", "allowed_tools": {"mode": ..., "tools": [...]}}',
            )
        if name not in {t.get("function", {}).get("name") for t in body.tools or []}:
            raise EpisodeError(400, f"tool_choice names {name!r}, which is not among the request's tools")
        return name
    if choice not in (None, "none", "auto", "required"):
        raise EpisodeError(400, f'tool_choice={choice!r}: use "none", "auto", "required" or a named function')
    return None


# Arguments of apply_chat_template that the gateway sets; a request's chat_template_kwargs may not.
RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "tools",
        "documents",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "return_dict",
        "return_tensors",
        "padding",
        "truncation",
        "max_length",
        "tokenizer_kwargs",
    }
)


def check_tools(tools: list[dict[str, Any]] | None) -> None:
    """Every tool must be a function the policy can be shown and its calls read as; a malformed
    one is a 400 that says which part is wrong, as OpenAI's is."""
    for index, tool in enumerate(tools or []):
        kind = tool.get("type") if isinstance(tool, dict) else None
        if kind != "function":
            raise EpisodeError(
                400,
                f"tools[{index}] (type {kind!r}) is not supported: give function tools, "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}',
            )
        function = tool.get("function")
        if function is None and "name" in tool:  # the most common mix-up of the two APIs
            raise EpisodeError(
                400,
                f"tools[{index}] is in the Responses API's shape (name at the top); chat completions "
                'takes {"type": "function", "function": {"name": ..., "parameters": {...}}}',
                param=f"tools[{index}]",
            )
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise EpisodeError(
                400,
                f"tools[{index}].function.name is missing: give "
                '{"type": "function", "function": {"name": ..., "parameters": {...}}}',
                param=f"tools[{index}].function.name",
            )
        check_parameters(function.get("parameters"), f"tools[{index}].function.parameters")


def check_parameters(parameters: Any, where: str) -> None:
    """A tool's parameters, when given, are a JSON Schema object: the template renders them
    for the policy, which would otherwise be shown whatever was sent."""
    if parameters is not None and not isinstance(parameters, dict):
        raise EpisodeError(
            400,
            f"{where} must be a JSON Schema object, got {type(parameters).__name__}: "
            'e.g. {"type": "object", "properties": {...}}',
            param=where,
        )


def check_tool_results(messages: list[dict[str, Any]]) -> None:
    """Tool calls and their results pair up by `tool_call_id`, as OpenAI's API requires: each
    tool message answers a call of the assistant message before it (other tool messages
    between), and each call of an assistant message is answered before the next other
    message or the end. Either broken is a 400 naming the ids, not a turn the model is shown
    (a call left unanswered would have the policy go on as if its result had been seen)."""
    offered: list[str] | None = None  # the ids of the calls the next tool message may answer
    unanswered: list[Any] = []  # of those, the ones no tool message has answered yet
    made_at = -1
    for index, message in enumerate(messages):
        role = message.get("role")
        if role != "tool":
            _check_answered(unanswered, made_at, f"messages[{index}] is a {role} message")
            calls = message.get("tool_calls") if role == "assistant" else None
            offered = [c.get("id") for c in calls if isinstance(c, dict)] if calls else None
            unanswered = list(offered or [])
            made_at = index
            continue
        call_id = message.get("tool_call_id")
        if offered is None:
            raise EpisodeError(
                400,
                f"messages[{index}]: messages with role 'tool' must be a response to a preceding message "
                "with 'tool_calls' ("
                + (f"messages[{made_at}] has none" if made_at >= 0 else "it is the first message")
                + "): put the assistant message whose call it answers before it",
            )
        if not isinstance(call_id, str) or call_id not in offered:
            raise EpisodeError(
                400,
                f"messages[{index}].tool_call_id {call_id!r} is not found in the tool_calls of the assistant "
                f"message before it (messages[{made_at}], ids {offered}): answer one of those calls by its id",
            )
        if call_id in unanswered:
            unanswered.remove(call_id)
    _check_answered(unanswered, made_at, "the conversation ends there")


def _check_answered(unanswered: list[Any], made_at: int, after: str) -> None:
    """OpenAI's 400 for calls of messages[made_at] that no tool message answered."""
    if unanswered:
        raise EpisodeError(
            400,
            f"messages[{made_at}]: an assistant message with 'tool_calls' must be followed by tool "
            f"messages responding to each 'tool_call_id'; these had none: "
            f"{', '.join(repr(call_id) for call_id in unanswered)} ({after}): send each call's result as "
            '{"role": "tool", "tool_call_id": ..., "content": ...} right after it',
            param=f"messages[{made_at}].tool_calls",
        )


def narrow_allowed_tools(body: ChatCompletionRequest) -> None:
    """tool_choice {"type": "allowed_tools", "allowed_tools": {"mode", "tools"}}: only the
    listed tools are offered, with tool_choice `mode` ("auto" or "required")."""
    choice = body.tool_choice
    if not (isinstance(choice, dict) and choice.get("type") == "allowed_tools"):
        return
    allowed = choice.get("allowed_tools") or {}
    mode = allowed.get("mode", "auto")
    if mode not in ("auto", "required"):
        raise EpisodeError(400, f'tool_choice.allowed_tools.mode={mode!r}: use "auto" or "required"')
    names = []
    for entry in allowed.get("tools") or []:
        name = (entry.get("function") or {}).get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str):
            raise EpisodeError(
                400,
                'tool_choice.allowed_tools.tools takes {"type": "function", "function": {"name": ...}} entries',
            )
        names.append(name)
    offered = {t["function"]["name"] for t in body.tools or []}
    missing = [name for name in names if name not in offered]
    if missing or not names:
        raise EpisodeError(
            400,
            f"tool_choice.allowed_tools names {missing or 'no tools'}, which must be among the request's tools",
        )
    body.tools = [t for t in body.tools or [] if t["function"]["name"] in names]
    body.tool_choice = mode


def chat_spec(
    gateway: Any, body: ChatCompletionRequest, limit_field: str = "max_tokens"
) -> tuple[CallSpec, ToolParser | None]:
    """The call a chat request asks for, and the tool parser for its reply (None: no tools).
    `limit_field` names the token limit in errors (the Responses API calls it max_output_tokens)."""
    check_tools(body.tools)
    narrow_allowed_tools(body)
    named = tool_choice_function(body)
    if (body.tool_choice == "required" or named) and not body.tools:
        raise EpisodeError(400, "tool_choice asks for a tool call but the request has no tools")
    # tool_choice "none": the model is not shown the tools, and its reply is not parsed for calls.
    tools = body.tools if body.tools and body.tool_choice != "none" else None
    parser = gateway.parser_for_tools() if tools else None
    prefix, end = "", None
    if parser is not None and (body.tool_choice == "required" or named):
        prefix = parser.opening(named)
    kind = (body.response_format or {}).get("type", "text")
    if kind not in ("text", "json_object", "json_schema"):
        raise EpisodeError(400, f"response_format.type={kind!r}: use text, json_object or json_schema")
    if kind != "text" and not prefix and parser is not None:
        # JSON mode with tools offered (an Agents SDK agent with tools and an output_type): the
        # model may call a tool instead, so nothing is forced; a reply that opens an object ends
        # where it closes.
        end = LeadingObjectEnd
    elif kind != "text" and not prefix:
        # JSON mode: the reply is opened with "{" and ends where that object closes.
        prefix, end = "{", JsonObjectEnd
    if parser is not None and body.parallel_tool_calls is False:
        # The agent is given one call: generation ends where it closes, so the recorded sample is
        # what the agent acted on, not calls it never saw.
        end = _first_end(end, parser.first_call_end)
    if body.top_logprobs and not body.logprobs:
        raise EpisodeError(400, "top_logprobs needs logprobs=true")
    reserved = sorted(RESERVED_TEMPLATE_KWARGS & set(body.chat_template_kwargs or {}))
    if reserved:
        raise EpisodeError(
            400,
            f"chat_template_kwargs may not set {', '.join(reserved)}: the gateway renders those itself "
            "(send tools in the request's tools)",
        )
    prompt_text = gateway.chat_prompt_text(body.messages, tools, body.chat_template_kwargs)
    prompt_ids = gateway.encode(prompt_text + prefix, body.add_special_tokens)
    asked = body.max_completion_tokens or body.max_tokens
    spec = CallSpec(
        prompt_ids,
        gateway.token_limit(len(prompt_ids), asked, limit_field),
        n=body.n,
        seed=body.seed,
        top_logprobs=body.top_logprobs or 0,
        stop=body.stop or [],
        prefix=prefix,
        hold=parser.content_end if parser is not None else None,
        end=end,
    )
    return spec, parser


def _first_end(
    made: Callable[[], Callable[[str], int | None]] | None, finder: Callable[[str], int | None]
) -> Callable[[], Callable[[str], int | None]]:
    """A maker of end finders that ends at whichever of `made`'s finder and `finder` ends first."""

    def make() -> Callable[[str], int | None]:
        other = made() if made is not None else None

        def end(text: str) -> int | None:
            found = [
                at for at in (finder(text), other(text) if other is not None else None) if at is not None
            ]
            return min(found) if found else None

        return end

    return make


def _message(choice: Choice, parser: ToolParser | None, parallel: bool) -> tuple[dict[str, Any], list]:
    content, tool_calls = parser.split(choice.text) if parser is not None else (choice.text, [])
    if not parallel:
        tool_calls = tool_calls[:1]
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message, tool_calls


def usage(prompt_tokens: int, choices: list[Choice]) -> dict[str, int]:
    completion = sum(len(c.record.completion_ids) for c in choices)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def logprobs_of(gateway: Any, choice: Choice) -> dict[str, Any]:
    """Every recorded token of the choice (its end-of-turn token too) with its behaviour
    logprob, decoded string, bytes and, when asked, the top alternatives."""
    tops = choice.top_logprobs or [None] * len(choice.record.completion_ids)
    return {
        "content": [
            token_entry(gateway.tokenizer, token, logprob, top)
            for token, logprob, top in zip(
                choice.record.completion_ids, choice.record.logprobs, tops, strict=True
            )
        ],
        "refusal": None,
    }


def _finish_reason(finished: bool, tool_calls: list, legacy: bool) -> str:
    return LEGACY_FINISH if legacy and tool_calls and finished else finish_reason(finished, tool_calls)


def chat_response(
    gateway: Any,
    body: ChatCompletionRequest,
    spec: CallSpec,
    parser: ToolParser | None,
    choices: list[Choice],
    episode_id: str,
    legacy: bool = False,
) -> dict[str, Any]:
    """The reply; `legacy`: the request sent `functions`, and is answered with
    `message.function_call` and finish_reason "function_call"."""
    out = []
    for choice in choices:
        message, tool_calls = _message(choice, parser, body.parallel_tool_calls is not False)
        out.append(
            {
                "index": choice.index,
                "message": legacy_message(message) if legacy else message,
                "finish_reason": _finish_reason(choice.record.finished, tool_calls, legacy),
                "logprobs": logprobs_of(gateway, choice) if body.logprobs else None,
            }
        )
    return {
        "id": completion_id("chatcmpl"),
        "object": "chat.completion",
        "created": now(),
        "model": body.model or gateway.model_name,
        "choices": out,
        "usage": usage(len(spec.prompt_ids), choices),
        "system_fingerprint": None,
        "forge": {"episode_id": episode_id, "policy_version": choices[0].record.policy_version},
    }


async def chat_stream(
    gateway: Any, body: ChatCompletionRequest, run: CallRun, parser: ToolParser | None, legacy: bool = False
) -> AsyncIterator[str]:
    """SSE chunks: content token by token as it is sampled (with its logprobs when asked),
    tool calls whole once their text is complete (`legacy`: the call as `delta.function_call`),
    then each choice's finish reason."""
    ident, created, model = completion_id("chatcmpl"), now(), body.model or gateway.model_name

    def chunk(index: int, delta: dict[str, Any], reason: str | None = None, logprobs: Any = None) -> str:
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}],
        }
        return f"data: {json.dumps(data)}\n\n"

    for index in range(run.spec.n):
        yield chunk(index, {"role": "assistant", "content": ""})

    def token_chunk(event: TokenEvent) -> str | None:
        """A sampled token's chunk: its settled text, and its logprob when asked for."""
        if not (event.text or body.logprobs):
            return None
        logprobs = None
        if body.logprobs:
            entry = token_entry(gateway.tokenizer, event.token_id, event.logprob, event.top)
            logprobs = {"content": [entry], "refusal": None}
        return chunk(event.index, {"content": event.text} if event.text else {}, logprobs=logprobs)

    choices = gateway.stream_events(run, token_chunk)
    async for piece in choices:
        yield piece
    done: list[Choice] = choices.result
    for choice in done:
        text = run.texts[choice.index]
        message, tool_calls = _message(choice, parser, body.parallel_tool_calls is not False)
        sent = choice.text[: text.sent]
        content = message["content"] or ""
        if content.startswith(sent) and len(content) > len(sent):
            yield chunk(choice.index, {"content": content[len(sent) :]})
        if legacy and tool_calls:  # one call: a legacy reply holds no more
            yield chunk(choice.index, {"function_call": dict(tool_calls[0]["function"])})
        for position, call in enumerate([] if legacy else tool_calls):
            yield chunk(choice.index, {"tool_calls": [{"index": position, **call}]})
        yield chunk(choice.index, {}, _finish_reason(choice.record.finished, tool_calls, legacy))
    if (body.stream_options or {}).get("include_usage"):
        data = {
            "id": ident,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [],
            "usage": usage(len(run.spec.prompt_ids), done),
        }
        yield f"data: {json.dumps(data)}\n\n"
    yield "data: [DONE]\n\n"
