"""Tools for envs: function schemas from plain Python methods, Hermes-style tool-call
parsing of model output, and `ToolEnv`, an `Env` whose actions are tool calls.

The schemas are the OpenAI function format that chat templates accept as `tools=`. The
model calls a tool by writing `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`;
a call that cannot be parsed or run becomes an error observation, never an exception.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
import time
import typing
from dataclasses import dataclass
from typing import Any

from forge.env.base import Env, StepResult
from forge.env.calls import ThreadCall, in_daemon_thread
from forge.env.tool_arguments import argument_problem, converted, json_schema

_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]


def tool(method: Any) -> Any:
    """Mark a `ToolEnv` method as a tool the model may call. Its signature's type hints and
    its docstring (first paragraph; `name: text` lines under `Args:`) become the schema."""
    method.__forge_tool__ = True
    return method


def _doc_parts(doc: str) -> tuple[str, dict[str, str]]:
    doc = inspect.cleandoc(doc or "")
    summary = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    params: dict[str, str] = {}
    if "Args:" in doc:
        for line in doc.split("Args:", 1)[1].splitlines():
            name, sep, text = line.strip().partition(":")
            if sep and name.isidentifier():
                params[name] = text.strip()
    return summary, params


def tool_schema(method: Any) -> dict[str, Any]:
    """The OpenAI function schema of a (bound or unbound) method or function."""
    hints = typing.get_type_hints(method)
    summary, param_docs = _doc_parts(method.__doc__)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for name, param in inspect.signature(method).parameters.items():
        if name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        prop: dict[str, Any] = json_schema(hints.get(name, Any))
        if name in param_docs:
            prop["description"] = param_docs[name]
        properties[name] = prop
        if param.default is inspect.Parameter.empty:
            required.append(name)
    return {
        "type": "function",
        "function": {
            "name": method.__name__,
            "description": summary,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def parse_tool_calls(text: str) -> tuple[list[ToolCall], list[str]]:
    """Hermes-style calls in `text`, and one error message per block that is not a valid call."""
    calls: list[ToolCall] = []
    errors: list[str] = []
    for block in _TOOL_CALL.findall(text):
        try:
            payload = json.loads(block)
        except json.JSONDecodeError as exc:
            errors.append(f"tool call is not valid JSON ({exc.msg} at char {exc.pos}): {block.strip()[:200]}")
            continue
        if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
            errors.append('tool call must be a JSON object {"name": ..., "arguments": {...}}')
            continue
        arguments = payload.get("arguments", {})
        if isinstance(arguments, str):  # some models double-encode the arguments
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        if not isinstance(arguments, dict):
            errors.append(f"tool call {payload['name']!r}: arguments must be a JSON object")
            continue
        calls.append(ToolCall(payload["name"], arguments))
    tail = text.rsplit("</tool_call>", 1)[-1]
    if "<tool_call>" in tail:
        errors.append("tool call opened with <tool_call> but never closed with </tool_call>")
    return calls, errors


def parse_answer(text: str) -> str | None:
    """The last `<answer>...</answer>` in `text`, stripped, or None."""
    found = _ANSWER.findall(text)
    return found[-1].strip() if found else None


def hermes_tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The tool list as Hermes-style system text, for chat templates that ignore `tools=`."""
    listing = "\n".join(json.dumps(t) for t in tools)
    return (
        f"You may call these tools:\n<tools>\n{listing}\n</tools>\n"
        'Call one by replying <tool_call>{"name": <tool name>, "arguments": <JSON object>}</tool_call>.'
    )


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether `tokenizer`'s chat template puts the `tools=` schemas into the prompt."""
    marker = "forge_probe_tool_7f3a"
    probe = [
        {
            "type": "function",
            "function": {
                "name": marker,
                "description": "",
                "parameters": {"type": "object", "properties": {}},
            },
        }
    ]
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}], tools=probe, add_generation_prompt=True, tokenize=False
    )
    return marker in text


def truncate(text: str, max_chars: int) -> str:
    if len(text) <= max_chars:
        return text
    return text[:max_chars] + f"\n...[truncated {len(text) - max_chars} characters]"


def _starting_episode(reset: Any) -> Any:
    """`reset` preceded by `start_episode`, so a subclass cannot forget to clear the counters."""
    if inspect.iscoroutinefunction(reset):

        async def wrapped(self: ToolEnv, task: dict[str, Any], seed: int) -> str:
            self.start_episode()
            return await reset(self, task, seed)
    else:

        def wrapped(self: ToolEnv, task: dict[str, Any], seed: int) -> str:
            self.start_episode()
            return reset(self, task, seed)

    return functools.wraps(reset)(wrapped)


class ToolEnv(Env):
    """An env driven by tool calls. Subclass it, mark methods with `@tool`, implement
    `reset`, and `score_answer` (or `finish`, for a reply that calls no tool: by default its
    `<answer>` goes to `score_answer`).

    A tool returns a string (the observation) or a `StepResult` to end the episode. Sync
    tools run in a thread, so a sandboxed tool never blocks other episodes. `info` carries
    turns, tool calls, tool errors, tool seconds and, when done, success and outcome; the
    counters restart on every `reset`.
    """

    max_calls_per_turn: int = 8
    max_observation_chars: int = 4000
    # False: the system prompt explains the tools in a syntax of the env's own (see
    # `parse_calls`), so the harness puts no schemas into the prompt.
    render_tools: bool = True
    # What sub-agents of this env's agent read first (agent clusters, swarm.enabled).
    subagent_system_prompt: str | None = None
    turns: int = 0
    tool_calls: int = 0
    tool_errors: int = 0
    tool_seconds: float = 0.0

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "tools" not in cls.__dict__:  # a hand-written schema list wins
            names = [name for name in dir(cls) if getattr(getattr(cls, name, None), "__forge_tool__", False)]
            cls.tools = [tool_schema(getattr(cls, name)) for name in names] or None
        if "reset" in cls.__dict__:
            cls.reset = _starting_episode(cls.__dict__["reset"])

    def start_episode(self) -> None:
        """Clear the per-episode counters (done before every `reset`)."""
        self.turns = 0
        self.tool_calls = 0
        self.tool_errors = 0
        self.tool_seconds = 0.0

    def info(self, **extra: Any) -> dict[str, Any]:
        return {
            "turns": self.turns,
            "tool_calls": self.tool_calls,
            "tool_errors": self.tool_errors,
            "tool_seconds": self.tool_seconds,
            **extra,
        }

    def done(self, reward: float, success: bool, observation: str = "", **extra: Any) -> StepResult:
        """End the episode, recording the outcome."""
        outcome = "success" if success else "failure"
        return StepResult(observation, reward, True, self.info(success=success, outcome=outcome, **extra))

    def score_answer(self, answer: str) -> StepResult:
        raise NotImplementedError(f"{type(self).__name__} must implement score_answer or finish")

    def finish(self, action: str) -> StepResult:
        """A reply with no tool call: score its `<answer>`, or tell the model what to do."""
        answer = parse_answer(action)
        if answer is None:
            self.tool_errors += 1
            return StepResult(
                "error: reply with a <tool_call>{...}</tool_call> or a final <answer>...</answer>",
                info=self.info(),
            )
        return self.score_answer(answer)

    def parse_calls(self, action: str) -> tuple[list[ToolCall], list[str]]:
        """The tool calls in a reply, and one error per malformed one. Hermes-style by
        default; an env whose model writes calls another way overrides this."""
        return parse_tool_calls(action)

    def subtask_succeeded(self, prompt: str, answer: str) -> bool:
        """Whether a sub-agent given `prompt` finished its sub-task with `answer` (agent
        clusters); by default, any answer that is not an error."""
        return bool(answer.strip()) and not answer.startswith("error:")

    def add_tool(self, schema: dict[str, Any], function: Any) -> None:
        """Offer one more tool on this instance (the harness's spawn tool): `schema` joins
        `tools`, and a call by its name awaits `function(**arguments)` (a coroutine function)."""
        name = schema["function"]["name"]
        self.added_tools = {**getattr(self, "added_tools", {}), name: function}
        self.tools = [t for t in (self.tools or []) if t["function"]["name"] != name] + [schema]

    async def _call(self, call: ToolCall) -> str | StepResult:
        added = getattr(self, "added_tools", {}).get(call.name)
        if added is not None:
            problem = argument_problem(added, call.arguments)
            if problem is not None:
                return f"error: bad arguments for {call.name}: {problem}"
            try:
                return await added(**converted(added, call.arguments))
            except Exception as exc:  # the tool's failure is the model's observation
                return f"error: {call.name} failed: {type(exc).__name__}: {exc}"
        method = getattr(self, call.name, None) if not call.name.startswith("_") else None
        if method is None or not getattr(method, "__forge_tool__", False):
            known = ", ".join(t["function"]["name"] for t in self.tools or [])
            return f"error: unknown tool {call.name!r} (tools: {known})"
        problem = argument_problem(method, call.arguments)  # its hints too: the schema the model saw
        if problem is not None:
            return f"error: bad arguments for {call.name}: {problem}"
        try:
            arguments = converted(method, call.arguments)  # dataclass and pydantic objects built
            if inspect.iscoroutinefunction(method):
                return await method(**arguments)
            return await in_thread(method, **arguments)
        except Exception as exc:  # the tool's failure is the model's observation
            return f"error: {call.name} failed: {type(exc).__name__}: {exc}"

    async def step(self, action: str) -> StepResult:
        self.turns += 1
        calls, errors = self.parse_calls(action)
        if not calls and not errors:
            if inspect.iscoroutinefunction(self.finish):
                return await self.finish(action)
            return await in_thread(self.finish, action)  # grading may run the sandbox
        responses = [f"error: {message}" for message in errors]
        if len(calls) > self.max_calls_per_turn:
            responses.append(calls_past_limit(self.max_calls_per_turn))
            calls = calls[: self.max_calls_per_turn]
        for call in calls:
            started = time.monotonic()
            result = await self._call(call)
            self.tool_seconds += time.monotonic() - started
            self.tool_calls += 1
            if isinstance(result, StepResult):
                if result.done:
                    result.info = {**result.info, **self.info()}  # bookkeeping after this call
                    return result
                result = result.observation
            responses.append(str(result))
        self.tool_errors += sum(r.startswith("error:") for r in responses)
        return StepResult(self.format_responses(responses), 0.0, False, self.info())

    def format_responses(self, responses: list[str]) -> str:
        """One turn's tool responses as the observation the model reads next."""
        return "\n".join(
            f"<tool_response>\n{truncate(r, self.max_observation_chars)}\n</tool_response>" for r in responses
        )


def calls_past_limit(max_calls_per_turn: int) -> str:
    """The response to a reply with more tool calls than `max_calls_per_turn` (the first run)."""
    return f"error: at most {max_calls_per_turn} tool calls per turn; the rest were ignored"


async def in_thread(function: Any, *args: Any, **kwargs: Any) -> Any:
    """A sync tool or grader in a daemon thread; when the step awaiting it is given up on
    (its `env.step_timeout_s`), the call is abandoned like any env call (see `ThreadCall`)."""
    call = ThreadCall()
    try:
        return await in_daemon_thread(function, *args, call=call, **kwargs)
    except asyncio.CancelledError:
        call.abandon()
        raise
