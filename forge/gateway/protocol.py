"""The OpenAI wire format: request bodies, rendering messages through the chat template,
and turning sampled text back into OpenAI `choices` with `tool_calls`."""

from __future__ import annotations

import json
import secrets
import time
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from forge.env.tools import hermes_tools_prompt

# Fields of OpenAI's API that change nothing a reply holds (storage, billing, caching,
# moderation of the account's traffic): accepted and left unused.
NO_EFFECT_FIELDS = frozenset(
    {
        "store",
        "metadata",
        "service_tier",
        "prediction",
        "prompt_cache_key",
        "prompt_cache_retention",
        "prompt_cache_options",
        "safety_identifier",
        "user",
    }
)
# Fields the gateway knows but cannot honour, and what to do instead.
CANNOT_HONOUR = {
    "audio": "its policy writes text only; leave audio unset",
    "web_search_options": "it has no web search; leave web_search_options unset",
    "reasoning_effort": "the policy reasons as its chat template and training make it, whatever "
    "the effort asked: leave reasoning_effort unset",
    "verbosity": "the policy's length is its own, whatever verbosity asks: leave verbosity unset",
}


def refused_field(fields: dict[str, Any] | None, known: frozenset[str] = frozenset()) -> str | None:
    """The first field of a request's extras that the gateway would otherwise ignore while it
    changes what the agent asked for, as an error message. A null is no request at all."""
    for name, value in (fields or {}).items():
        if value is None or name in NO_EFFECT_FIELDS or name in known:
            continue
        if name == "modalities" and value == ["text"]:
            continue
        if name == "modalities":
            return f'modalities={value!r}: the Forge gateway\'s policy writes text only; ask for ["text"]'
        if name in CANNOT_HONOUR:
            return f"{name} is not supported by the Forge gateway: {CANNOT_HONOUR[name]}"
        return (
            f"unrecognized request field {name!r}: the Forge gateway honours every field it takes "
            "and does not know this one (an ignored field would change what was asked); leave it out"
        )
    return None


class OpenAIBody(BaseModel):
    """A request body as OpenAI's API reads it: a field sent as null is a field not sent
    (clients pass `n=None`, `stream=None` through the SDK as JSON nulls)."""

    model_config = ConfigDict(extra="allow")

    @model_validator(mode="before")
    @classmethod
    def _null_is_unset(cls, data: Any) -> Any:
        return (
            {key: value for key, value in data.items() if value is not None}
            if isinstance(data, dict)
            else data
        )


class SamplingFields(OpenAIBody):
    """What chat and completions requests share: limits, sampling, stop strings, n."""

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
        refused = refused_field(self.model_extra)
        if refused:
            return refused
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
    # vLLM's and SGLang's extra field (extra_body), e.g. {"enable_thinking": false} for Qwen3
    chat_template_kwargs: dict[str, Any] | None = None
    # vLLM's extra field, with its default: the template writes any BOS itself; true encodes
    # the rendered prompt with the tokenizer's special tokens as well, as vLLM does.
    add_special_tokens: bool = False
    # The API's deprecated form of tools and tool_choice (`forge.gateway.legacy`).
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)
    # vLLM's extra field, with its default: a text prompt is encoded with the tokenizer's
    # special tokens (the BOS of a model whose tokenizer adds one), as vLLM serves it.
    add_special_tokens: bool = True

    def unsupported(self) -> str | None:
        if self.best_of is not None and self.best_of != self.n:
            return (
                f"best_of={self.best_of} with n={self.n} is not supported: the gateway returns every "
                f"sample it draws (each is recorded for training); ask for n={self.best_of} and pick"
            )
        return super().unsupported()


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


TEXT_PARTS = ("text", "input_text", "output_text")


def text_content(content: Any) -> str:
    """OpenAI message content (a string, null, or a list of text parts) as one string. A part
    that is not text (an image, audio, a file) is refused: the policy would never see it."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for number, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind not in TEXT_PARTS and kind != "refusal":
                raise ValueError(
                    f"content part type {kind!r} is not supported: the Forge gateway's policy reads "
                    'text only; send text parts ({"type": "text", "text": ...})'
                )
            text = part.get("refusal" if kind == "refusal" else "text")
            if not isinstance(text, str):
                field = "refusal" if kind == "refusal" else "text"
                got = "it is missing" if text is None else f"got {type(text).__name__}"
                raise ValueError(f"content part {number}'s {field} must be a string, {got}")
            texts.append(text)
        return "".join(texts)
    raise ValueError(
        f"message content must be a string or a list of text parts, got {type(content).__name__}"
    )


def _arguments(call: dict[str, Any]) -> dict[str, Any]:
    raw = call.get("function", {}).get("arguments", {})
    if isinstance(raw, str):
        try:
            raw = json.loads(raw) if raw.strip() else {}
        except json.JSONDecodeError as exc:
            raise ValueError(f"tool call arguments are not valid JSON: {exc.msg}") from None
    return raw


def template_messages(
    messages: list[dict[str, Any]], tools: list[dict] | None, tool_aware: bool
) -> list[dict]:
    """Messages as the chat template takes them. A template that renders tools gets OpenAI
    tool calls as structured `tool_calls`; any other gets them in Hermes text
    (`<tool_call>...</tool_call>`, `<tool_response>...</tool_response>`), the same text
    the gateway parses the model's calls from."""
    rendered: list[dict[str, Any]] = []
    names: dict[str, str] = {}  # tool call id -> function name
    for index, message in enumerate(messages):
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise ValueError(
                f"messages[{index}].role={role!r}: use system, developer, user, assistant or tool"
            )
        role = "system" if role == "developer" else role
        try:
            content = text_content(message.get("content"))
        except ValueError as exc:
            raise ValueError(f"messages[{index}]: {exc}") from None
        calls = message.get("tool_calls") or []
        for number, call in enumerate(calls):
            function = call.get("function") if isinstance(call, dict) else None
            if not (isinstance(function, dict) and isinstance(function.get("name"), str)):
                raise ValueError(
                    f"messages[{index}].tool_calls[{number}] has no function name: give "
                    '{"id": ..., "type": "function", "function": {"name": ..., "arguments": "{...}"}}'
                )
        if role == "assistant" and calls:
            if tool_aware:
                structured = [
                    {
                        "id": c.get("id", ""),
                        "type": "function",
                        "function": {"name": c["function"]["name"], "arguments": _arguments(c)},
                    }
                    for c in calls
                ]
                names.update((c.get("id"), c["function"]["name"]) for c in calls)
                rendered.append({"role": role, "content": content, "tool_calls": structured})
                continue
            blocks = [
                "<tool_call>"
                + json.dumps({"name": c["function"]["name"], "arguments": _arguments(c)})
                + "</tool_call>"
                for c in calls
            ]
            content = "\n".join(([content] if content else []) + blocks)
        elif role == "tool" and not tool_aware:
            content = f"<tool_response>\n{content}\n</tool_response>"
        elif role == "tool":  # templates that show which call a result answers read these
            call_id = message.get("tool_call_id", "")
            rendered.append(
                {
                    "role": role,
                    "content": content,
                    "tool_call_id": call_id,
                    "name": message.get("name") or names.get(call_id, ""),
                }
            )
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
    """A reply cut at its token limit is "length" even after a whole tool call: the calls
    may be missing one (the Responses API calls it incomplete)."""
    if not finished:
        return "length"
    return "tool_calls" if tool_calls else "stop"


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def completion_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def now() -> int:
    return int(time.time())
