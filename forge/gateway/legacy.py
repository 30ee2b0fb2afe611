"""Chat Completions' deprecated `functions` / `function_call` (older LangChain function
agents, older cookbook code): translated to tools and tool_choice on the way in, and the
reply given back in the legacy shape the client asked for (`message.function_call`,
finish_reason "function_call")."""

from __future__ import annotations

from typing import Any

from forge.gateway.episodes import EpisodeError
from forge.gateway.protocol import ChatCompletionRequest

FINISH_REASON = "function_call"


def legacy_call_id(index: int) -> str:
    """The id a legacy function call of the history is given as a tool call (messages[index]):
    the legacy form has none, and the function message after it answers it. Nine letters and
    digits, the form Mistral's templates require of an id."""
    return f"fn{index:07d}"


def translate_functions(body: ChatCompletionRequest) -> bool:
    """Put a request's `functions` / `function_call` and its legacy history (assistant
    `function_call`, role `function` results) into tools, tool_choice and tool messages, in
    place. True when the request offered `functions`: its reply is then in the legacy shape."""
    body.messages = _history(body.messages)
    legacy = body.functions is not None
    if legacy and body.tools is not None:
        raise EpisodeError(
            400,
            "functions and tools are both set: functions is the deprecated form of tools; send one of them",
        )
    if body.function_call is not None and body.tool_choice is not None:
        raise EpisodeError(
            400,
            "function_call and tool_choice are both set: function_call is the deprecated form of "
            "tool_choice; send one of them",
        )
    if body.function_call is not None and not body.functions:
        raise EpisodeError(
            400, "function_call is set but the request has no functions: send functions with it, or neither"
        )
    if not legacy:
        return False
    tools = []
    for index, function in enumerate(body.functions or []):
        if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
            raise EpisodeError(
                400,
                f'functions[{index}] has no name: give {{"name": ..., "description": ..., "parameters": {{...}}}}',
            )
        tools.append({"type": "function", "function": function})
    body.tools = tools
    choice = body.function_call
    if isinstance(choice, dict):
        if not isinstance(choice.get("name"), str):
            raise EpisodeError(400, 'function_call must be "none", "auto" or {"name": ...}')
        body.tool_choice = {"type": "function", "function": {"name": choice["name"]}}
    elif choice in (None, "none", "auto"):
        body.tool_choice = choice
    else:
        raise EpisodeError(400, f'function_call={choice!r}: use "none", "auto" or {{"name": ...}}')
    # A legacy reply holds one function call: generation ends where the first closes, so the
    # recorded sample is the call the client was given.
    body.parallel_tool_calls = False
    return True


def _history(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Legacy turns as tool turns: an assistant message's `function_call` becomes its one tool
    call, and the role `function` message after it the tool message answering it. The chat
    template then renders them as it renders tool calls and results."""
    translated: list[dict[str, Any]] = []
    open_call: tuple[str, str] | None = None  # (id, name) of the call a function message answers
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        call = message.get("function_call") if role == "assistant" else None
        if call is not None:
            if not (isinstance(call, dict) and isinstance(call.get("name"), str)):
                raise EpisodeError(
                    400, f'messages[{index}].function_call must be {{"name": ..., "arguments": "{{...}}"}}'
                )
            if message.get("tool_calls"):
                raise EpisodeError(
                    400,
                    f"messages[{index}] has both function_call and tool_calls: function_call is the "
                    "deprecated form of tool_calls; send one of them",
                )
            ident = legacy_call_id(index)
            message = {key: value for key, value in message.items() if key != "function_call"}
            message["tool_calls"] = [
                {
                    "id": ident,
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call.get("arguments") or "{}"},
                }
            ]
            open_call = (ident, call["name"])
        elif role == "function":
            name = message.get("name")
            if open_call is None or name != open_call[1]:
                raise EpisodeError(
                    400,
                    f"messages[{index}] (role function, name {name!r}) answers no function_call: it must "
                    "follow the assistant message whose function_call named that function",
                )
            message = {
                "role": "tool",
                "tool_call_id": open_call[0],
                "name": name,
                "content": message.get("content"),
            }
            open_call = None  # a legacy message carries one call, answered once
        elif role != "tool":
            open_call = None
        translated.append(message)
    return translated


def legacy_message(message: dict[str, Any]) -> dict[str, Any]:
    """A reply message in the legacy shape: its (one) tool call as `function_call`."""
    calls = message.pop("tool_calls", None)
    if calls:
        message["function_call"] = dict(calls[0]["function"])
    return message
