"""The OpenAI wire format: request bodies, rendering messages through the chat template,
and turning sampled text back into OpenAI `choices` with `tool_calls`."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from forge.env.tools import hermes_tools_prompt


class SamplingFields(BaseModel):
    """What chat and completions requests share: limits, sampling, stop strings, n."""

    model_config = ConfigDict(extra="allow")
    model: str = ""
    max_tokens: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=16, description="choices sampled from one prefill; each is a training sample")
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop: str | list[str] | None) -> list[str] | None:
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and (len(stops) > 4 or not all(stops)):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    def unsupported(self) -> str | None:
        """A field set to something the gateway cannot do, as an error message."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                return f"{name} is not supported by the Forge gateway (it would change the behaviour policy); leave it unset or 0"
        if self.logit_bias:
            return "logit_bias is not supported by the Forge gateway; leave it unset"
        return None


class ChatCompletionRequest(SamplingFields):
    """An OpenAI chat completion request; see `forge/gateway/README` in the project README
    for what each field does here."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    max_completion_tokens: int | None = Field(None, gt=0)
    logprobs: bool = Field(False, description="return the behaviour logprob of each generated token")
    top_logprobs: int | None = Field(None, ge=0, le=20)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None


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
    names: dict[str, str] = {}  # tool call id -> function name
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
                    {"id": c.get("id", ""), "type": "function",
                     "function": {"name": c["function"]["name"], "arguments": _arguments(c)}}
                    for c in calls
                ]
                names.update((c.get("id"), c["function"]["name"]) for c in calls)
                rendered.append({"role": role, "content": content, "tool_calls": structured})
                continue
            blocks = [
                "<tool_call>" + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)}) + "</tool_call>"
                for c in calls
            ]
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool" and not tool_aware:
            content = f"<tool_response>\n{content}\n</tool_response>"
        elif role == "tool":  # templates that show which call a result answers read these
            call_id = message.get("tool_call_id", "")
            rendered.append({"role": role, "content": content, "tool_call_id": call_id,
                             "name": message.get("name") or names.get(call_id, "")})
            continue
        rendered.append({"role": role, "content": content})
    if tools and not tool_aware:
        listing = hermes_tools_prompt(tools)
        if rendered[0]["role"] == "system":
            rendered[0] = {"role": "system", "content": rendered[0]["content"] + "\n\n" + listing}
        else:
            rendered.insert(0, {"role": "system", "content": listing})
    return rendered


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
