"""The OpenAI wire format: request bodies, rendering messages through the chat template,
and turning sampled text back into OpenAI `choices` with `tool_calls`."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from forge.env.tools import _TOOL_CALL, hermes_tools_prompt, parse_tool_calls


class ChatCompletionRequest(BaseModel):
    """The fields the gateway acts on; sampling knobs (temperature, top_p, ...) are
    accepted and ignored, since behaviour logprobs must come from the training policy."""

    model_config = ConfigDict(extra="allow")
    model: str = ""
    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    max_tokens: int | None = Field(None, gt=0)
    max_completion_tokens: int | None = Field(None, gt=0)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    logprobs: bool = Field(False, description="return the behaviour logprob of each generated token")
    n: int = Field(1, ge=1, le=1, description="one choice per call: each call is one training sample")
    user: str | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = ""
    prompt: str
    max_tokens: int | None = Field(None, gt=0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)
    user: str | None = None


class StartEpisodeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    task: dict[str, Any] | None = Field(None, description="the task row; unset takes the gateway's next task")
    group_id: str | None = Field(None, description="episodes with one group_id share advantage statistics")


class StepRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: str


class FinishRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reward: float | None = Field(None, description="the outcome; unset lets the env's verifier decide")
    answer: str | None = Field(None, description="a final reply for the env to score, when reward is unset")


def text_content(content: Any) -> str:
    """OpenAI message content (a string, null, or a list of text parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    raise ValueError(f"message content must be a string or a list of text parts, got {type(content).__name__}")


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    raw = call.get("function", {}).get("arguments", {})
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call arguments are not valid JSON: {exc.msg}") from None
    return raw


def template_messages(messages: list[dict[str, Any]], tools: list[dict] | None, tool_aware: bool) -> list[dict]:
    """Messages as the chat template takes them. A template that renders tools gets OpenAI
    tool calls as structured `tool_calls`; any other gets them in Hermes text
    (`<tool_call>...</tool_call>`, `<tool_response>...</tool_response>`), the same text
    the gateway parses the model's calls from."""
    rendered: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(f"messages[{index}].role={role!r}: use system, user, assistant or tool")
        role = "system" if role == "developer" else role
        content = text_content(message.get("content"))
        calls = message.get("tool_calls") or []
        if role == "assistant" and calls:
            if tool_aware:
                structured = [
                    {"type": "function", "function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
                    for c in calls
                ]
                rendered.append({"role": role, "content": content, "tool_calls": structured})
                continue
            blocks = [
                "<tool_call>" + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}) + "</tool_call>"
                for c in calls
            ]
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool" and not tool_aware:
            content = f"<tool_response>\n{content}\n</tool_response>"
        rendered.append({"role": role, "content": content})
    if tools and not tool_aware:
        listing = hermes_tools_prompt(tools)
        if rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + listing}
        else:
            rendered.insert(0, {"role": "system", "content": listing})
    return rendered


def split_tool_calls(text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The model's reply as OpenAI `content` and `tool_calls` (Hermes `<tool_call>` blocks).
    A malformed block stays in `content` for the agent to see."""
    calls, _ = parse_tool_calls(text)
    if not calls:
        return text, []
    content = _TOOL_CALL.sub("", text).strip() or None
    tool_calls = [
        {
            "id": f"call_{secrets.token_hex(8)}",
            "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments)},
        }
        for call in calls
    ]
    return content, tool_calls


def finish_reason(finished: bool, tool_calls: list) -> str:
    if tool_calls:
        return "tool_calls"
    return "stop" if finished else "length"


def error_body(message: str, kind: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}


def completion_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
