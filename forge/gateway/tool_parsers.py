"""Tool calls in a model's reply, per model family: Hermes / Qwen (`<tool_call>` blocks),
Llama 3 JSON (`{"name": ..., "parameters": ...}`) and Mistral (`[TOOL_CALLS][...]`).

The family is read from the chat template, or set with `gateway.tool_parser`. Each parser
turns text into OpenAI `tool_calls`, says where tool-call text may begin (streaming holds
it back), and writes the opening of a call (for `tool_choice` required or named).
"""

from __future__ import annotations

import json
import re
import secrets
import string
from typing import Any

ToolCalls = list[dict[str, Any]]


def _openai_call(name: str, arguments: Any, call_id: str) -> dict[str, Any]:
    if isinstance(arguments, str):  # some models double-encode the arguments
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}


def _partial_marker_end(text: str, marker: str) -> int:
    """Where `marker` begins in `text`, or where an unfinished copy of it ends the text."""
    found = text.find(marker)
    if found >= 0:
        return found
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return len(text) - size
    return len(text)


class ToolParser:
    name = ""
    markers: tuple[str, ...] = ()  # special tokens that are part of a call's text

    def call_id(self) -> str:
        return f"call_{secrets.token_hex(8)}"

    def split(self, text: str) -> tuple[str | None, ToolCalls]:
        """The reply as OpenAI `content` and `tool_calls`; text that is no valid call stays content."""
        raise NotImplementedError

    def content_end(self, text: str) -> int:
        """How much of `text` is surely content, not (the start of) a tool call."""
        raise NotImplementedError

    def opening(self, function: str | None) -> str:
        """Text that starts a call (of `function`, if named), for the model to go on from."""
        raise NotImplementedError

    def first_call_end(self, text: str) -> int | None:
        """One past where the reply's first call is complete, or None while it is not (for
        `parallel_tool_calls: false`: generation ends there, so the sample holds the one call
        the agent is given)."""
        raise NotImplementedError


class HermesParser(ToolParser):
    """Hermes / Qwen 2.5+: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block per call."""

    name = "hermes"
    _block = re.compile(r"<tool_call>(.*?)(?:</tool_call>|$)", re.DOTALL)

    def split(self, text: str) -> tuple[str | None, ToolCalls]:
        calls, spans = [], []
        for match in self._block.finditer(text):
            try:
                payload = json.loads(match.group(1))
            except json.JSONDecodeError:
                continue
            if isinstance(payload, dict) and isinstance(payload.get("name"), str):
                calls.append(_openai_call(payload["name"], payload.get("arguments", {}), self.call_id()))
                spans.append(match.span())
        if not calls:
            return text, []
        content = "".join(
            text[a:b]
            for a, b in zip([0] + [e for _, e in spans], [s for s, _ in spans] + [len(text)], strict=True)
        ).strip()
        return content or None, calls

    def content_end(self, text: str) -> int:
        return _partial_marker_end(text, "<tool_call>")

    def opening(self, function: str | None) -> str:
        return '<tool_call>\n{"name": "' + (f'{function}", "arguments": ' if function else "")

    def first_call_end(self, text: str) -> int | None:
        for match in re.finditer(r"<tool_call>(.*?)</tool_call>", text, re.DOTALL):
            if self.split(match.group(0))[1]:  # a block that is no valid call does not count
                return match.end()
        return None


class Llama3JsonParser(ToolParser):
    """Llama 3.1+ JSON tool calling: the whole reply is `{"name": ..., "parameters": {...}}`
    (optionally after `<|python_tag|>`; several calls separated by `;`)."""

    name = "llama3_json"
    markers = ("<|python_tag|>",)

    def split(self, text: str) -> tuple[str | None, ToolCalls]:
        body = text.strip().removeprefix("<|python_tag|>").strip()
        if not body.startswith("{"):
            return text, []
        decoder, calls, at = json.JSONDecoder(), [], 0
        while at < len(body):
            try:
                payload, at = decoder.raw_decode(body, at)
            except json.JSONDecodeError:
                return text, []
            if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
                return text, []
            arguments = payload.get("parameters", payload.get("arguments", {}))
            calls.append(_openai_call(payload["name"], arguments, self.call_id()))
            while at < len(body) and body[at] in "; \n\t":
                at += 1
        return None, calls

    def content_end(self, text: str) -> int:
        body = text.lstrip()
        if not body or body.startswith("{") or "<|python_tag|>".startswith(body[:14]):
            return 0
        return len(text)

    def opening(self, function: str | None) -> str:
        return '{"name": "' + (f'{function}", "parameters": ' if function else "")

    def first_call_end(self, text: str) -> int | None:
        start = _after_space(text, 0)
        if text.startswith("<|python_tag|>", start):
            start = _after_space(text, start + len("<|python_tag|>"))
        return _object_end(text, start)


class MistralParser(ToolParser):
    """Mistral (v3 tokenizer): `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`; call
    ids are 9 letters or digits, as Mistral's chat template requires."""

    name = "mistral"
    markers = ("[TOOL_CALLS]",)

    def call_id(self) -> str:
        alphabet = string.ascii_letters + string.digits
        return "".join(secrets.choice(alphabet) for _ in range(9))

    def split(self, text: str) -> tuple[str | None, ToolCalls]:
        at = text.find("[TOOL_CALLS]")
        if at < 0:
            return text, []
        body = text[at + len("[TOOL_CALLS]") :].lstrip()
        try:
            payload, _ = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            # A list cut after its first call (parallel_tool_calls false ends generation there).
            end = _object_end(body, _after_space(body, 1)) if body.startswith("[") else None
            if end is None:
                return text, []
            payload = [json.loads(body[_after_space(body, 1) : end])]
        payload = payload if isinstance(payload, list) else [payload]
        if not all(isinstance(p, dict) and isinstance(p.get("name"), str) for p in payload):
            return text, []
        calls = [_openai_call(p["name"], p.get("arguments", {}), self.call_id()) for p in payload]
        return text[:at].strip() or None, calls

    def content_end(self, text: str) -> int:
        return _partial_marker_end(text, "[TOOL_CALLS]")

    def opening(self, function: str | None) -> str:
        return '[TOOL_CALLS][{"name": "' + (f'{function}", "arguments": ' if function else "")

    def first_call_end(self, text: str) -> int | None:
        at = text.find("[TOOL_CALLS]")
        if at < 0:
            return None
        at = _after_space(text, at + len("[TOOL_CALLS]"))
        return _object_end(text, _after_space(text, at + 1) if text.startswith("[", at) else at)


def _after_space(text: str, at: int) -> int:
    return len(text) - len(text[at:].lstrip())


def _object_end(text: str, start: int) -> int | None:
    """One past the JSON object that begins at `start`, or None while it is open (or none does)."""
    if not text.startswith("{", start):
        return None
    try:
        return json.JSONDecoder().raw_decode(text, start)[1]
    except json.JSONDecodeError:
        return None


PARSERS: dict[str, type[ToolParser]] = {p.name: p for p in (HermesParser, Llama3JsonParser, MistralParser)}


def choose_tool_parser(tokenizer: Any, setting: str = "auto") -> ToolParser:
    """The parser named by `setting`, or for "auto" the family the chat template writes."""
    if setting != "auto":
        if setting not in PARSERS:
            raise ValueError(f"gateway.tool_parser={setting!r}: use auto, " + ", ".join(PARSERS))
        return PARSERS[setting]()
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):
        template = " ".join(template.values())
    if "[TOOL_CALLS]" in template:
        return MistralParser()
    if "<|python_tag|>" in template or '"parameters": ' in template or "ipython" in template:
        return Llama3JsonParser()
    return HermesParser()
