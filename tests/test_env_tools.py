"""Tool schemas, Hermes-style tool-call parsing and ToolEnv dispatch."""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import threading
import time
from typing import Any, Literal, NotRequired, TypedDict

import pydantic
import pytest
from hypothesis import given
from hypothesis import strategies as st

from forge.env import StepResult, ToolEnv, parse_tool_calls, tool
from forge.env.calls import call_sync
from forge.env.tool_arguments import expected, json_schema
from forge.env.tools import ToolCall, parse_answer, tool_schema


def call(name: str, **arguments) -> str:
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def test_a_hermes_tool_call_is_parsed():
    calls, errors = parse_tool_calls(
        'thinking... <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>'
    )
    assert calls == [ToolCall("add", {"a": 1})] and errors == []


def test_several_calls_in_one_reply_are_parsed_in_order():
    calls, _ = parse_tool_calls(call("a") + " and " + call("b", x=2))
    assert [c.name for c in calls] == ["a", "b"]


def test_text_without_tool_calls_parses_to_nothing():
    assert parse_tool_calls("the answer is 4") == ([], [])


def test_malformed_json_becomes_an_error_message():
    calls, errors = parse_tool_calls("<tool_call>{name: add}</tool_call>")
    assert calls == [] and "not valid JSON" in errors[0]


def test_a_call_without_a_name_is_an_error():
    _, errors = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call><tool_call>[1, 2]</tool_call>')
    assert len(errors) == 2 and all('"name"' in e for e in errors)


def test_arguments_that_are_not_an_object_are_an_error():
    _, errors = parse_tool_calls('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')
    assert "arguments must be a JSON object" in errors[0]


def test_double_encoded_arguments_are_accepted():
    calls, _ = parse_tool_calls('<tool_call>{"name": "f", "arguments": "{\\"x\\": 1}"}</tool_call>')
    assert calls == [ToolCall("f", {"x": 1})]


def test_an_unclosed_tool_call_is_an_error():
    _, errors = parse_tool_calls(call("a") + ' <tool_call>{"name": "b"')
    assert errors == ["tool call opened with <tool_call> but never closed with </tool_call>"]


@given(st.text())
def test_parsing_never_raises(text):
    calls, errors = parse_tool_calls(text)
    assert isinstance(calls, list) and isinstance(errors, list)


def test_parse_answer_takes_the_last_answer():
    assert parse_answer("<answer>1</answer> no, <answer> 2 </answer>") == "2"
    assert parse_answer("no answer") is None


def test_schema_comes_from_signature_and_docstring():
    def search(query: str, limit: int = 5, exact: bool | None = None) -> str:
        """Search the index.

        Args:
            query: words to look for
            limit: most results to return
        """
        return ""

    schema = tool_schema(search)["function"]
    assert schema["name"] == "search" and schema["description"] == "Search the index."
    assert schema["parameters"] == {
        "type": "object",
        "properties": {
            "query": {"type": "string", "description": "words to look for"},
            "limit": {"type": "integer", "description": "most results to return"},
            "exact": {"type": ["boolean", "null"]},  # None is a value it takes
        },
        "required": ["query"],
    }


def test_a_literal_parameter_offers_its_values_typed_by_them():
    def sort(order: Literal["asc", "desc"], depth: Literal[1, 2, 3] | None = None) -> str:
        return ""

    properties = tool_schema(sort)["function"]["parameters"]["properties"]
    assert properties["order"] == {"type": "string", "enum": ["asc", "desc"]}
    assert properties["depth"] == {"type": ["integer", "null"], "enum": [1, 2, 3, None]}  # not a string


def test_a_union_shows_every_type_it_takes_and_a_hint_not_checked_shows_any_value():
    def find(
        key: int | str, mode: Literal["a", "b"] | int, extra: Any, bare, since: float | None = None
    ) -> str:
        return ""

    properties = tool_schema(find)["function"]["parameters"]["properties"]
    assert properties["key"] == {"type": ["integer", "string"]}  # not just the first
    assert properties["mode"] == {"anyOf": [{"type": "string", "enum": ["a", "b"]}, {"type": "integer"}]}
    assert properties["extra"] == properties["bare"] == {}  # JSON Schema's "any value", not "string"
    assert properties["since"] == {"type": ["number", "null"]}


class Span(TypedDict):
    a: int
    b: NotRequired[str | None]


class Loose(TypedDict, total=False):
    a: list[int]
    x: Any


@dataclasses.dataclass
class Box:
    a: int
    b: Literal["x", "y"] = "x"


@dataclasses.dataclass
class Shelf:
    a: list[Box]
    x: Box | None = None


@dataclasses.dataclass
class Node:  # holds itself: below its first level, any value
    a: int
    b: list[Node] = dataclasses.field(default_factory=list)


class Mode(enum.Enum):
    A = "a"
    X = "x"


class Rank(enum.IntEnum):
    ONE = 1
    TWO = 2


class Point(pydantic.BaseModel):
    a: float
    b: int | None = None


class Path(pydantic.BaseModel):
    a: list[Point]
    x: Point | None = None


_HINTS = [str, int, float, bool, list, dict, list[str], dict[str, int], int | str, float | None, bool | None,
          Literal["a", "b"], Literal[1, 2] | None, Literal["x"] | int, Literal[1, "1"], int | list | None, Any,
          object, list[int], list[str | None], list[int] | None, list[list[Literal["a", "b"]]],
          list[int] | list[str], int | dict[str, int] | None, list[Any], dict[str, Any],
          Literal["a", None], Span, Loose, Box, Shelf, Node, Span | None, list[Box], Box | dict[str, int],
          Point, Path, Path | None, list | list[int], Mode, Rank | None, Mode | int, list[Mode],
          tuple, tuple[int, ...], tuple[int, str], tuple[()], tuple[int, Any] | None, tuple[int, int] | list[str],
          tuple[Mode, Box]]  # fmt: skip
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=3)
    | st.sampled_from(["a", "b", "x", "1", 1, 2])
    | st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer()),
    lambda inner: (
        st.lists(inner, max_size=2)
        | st.dictionaries(st.sampled_from(["a", "b", "x"]) | st.text(max_size=2), inner, max_size=3)
    ),
    max_leaves=6,
)  # a float with an integral value (1.0) is left out: JSON Schema counts it an integer, a tool's int is no float


@pytest.mark.parametrize("hint", _HINTS, ids=str)
@given(value=_JSON_VALUES)
def test_a_call_is_refused_exactly_when_its_value_breaks_the_schema_the_model_was_shown(hint, value):
    """The schema and the check read the hint once: no value the schema admits is refused,
    and none it rules out reaches the tool (checked by a JSON Schema validator)."""
    jsonschema = pytest.importorskip("jsonschema")
    shown = json_schema(hint)
    jsonschema.Draft202012Validator.check_schema(shown)
    refused = expected(hint, value) is not None
    assert refused != jsonschema.Draft202012Validator(shown).is_valid(value), (hint, value)


def test_a_typeddict_or_dataclass_is_an_object_of_its_fields_and_a_pydantic_model_its_own_schema():
    assert json_schema(Span) == {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": ["string", "null"]}},
        "required": ["a"],
        "additionalProperties": False,
    }
    shelf = json_schema(Shelf | None)
    assert shelf["type"] == ["object", "null"] and shelf["required"] == ["a"]
    assert shelf["properties"]["a"]["items"] == json_schema(Box)
    assert shelf["properties"]["x"] == {**json_schema(Box), "type": ["object", "null"]}
    node = json_schema(Node)["properties"]["b"]
    assert node == {"type": "array"}  # Node within Node: any value, not endless
    path = json_schema(Path)
    assert "$defs" not in json.dumps(path) and "$ref" not in json.dumps(path)  # stands anywhere
    assert path["properties"]["a"]["items"]["properties"]["a"] == {"title": "A", "type": "number"}


class Calculator(ToolEnv):
    @tool
    def add(self, a: int, b: int) -> str:
        """Add two integers."""
        self.thread = threading.current_thread()
        return str(a + b)

    @tool
    async def shout(self, text: str) -> str:
        """Upper-case text."""
        return text.upper()

    @tool
    def explode(self) -> str:
        """Always fails."""
        raise RuntimeError("boom")

    @tool
    def submit(self, value: int) -> StepResult:
        """Finish with a value."""
        return self.done(float(value == 42), value == 42, "submitted")

    def helper(self) -> str:  # not a tool
        return "secret"

    def reset(self, task, seed):
        return "go"


def step(env: ToolEnv, action: str) -> StepResult:
    return call_sync(env.step, action)


class Sorter(ToolEnv):
    @tool
    def sort(
        self, order: Literal["asc", "desc"], depth: Literal[1, 2] | None = None, scale: float = 1.0,
        items: list[str] | None = None, note: Any = None,
    ) -> str:  # fmt: skip
        """Sort."""
        self.got = (order, depth, scale, items, note)
        return "sorted"

    def reset(self, task, seed):
        return "go"


@pytest.mark.parametrize(
    ("arguments", "said"),
    [
        ({"order": "up"}, "order must be one of 'asc', 'desc' (got 'up')"),
        ({"order": "asc", "depth": "1"}, "depth must be one of 1, 2 or null (got '1')"),
        ({"order": "asc", "depth": True}, "depth must be one of 1, 2 or null (got True)"),
        ({"order": "asc", "scale": "2"}, "scale must be a number (got '2')"),
        (
            {"order": "asc", "items": "a,b"},
            "items must be an array whose items are each a string, or null (got 'a,b')",
        ),
        (
            {"order": "asc", "items": ["a", 1]},
            "items must be an array whose items are each a string, or null (got ['a', 1])",
        ),
        ({"order": 1}, "order must be one of 'asc', 'desc' (got 1)"),
    ],
)
def test_an_argument_its_hint_rules_out_is_an_error_the_tool_never_sees(arguments, said):
    """The schema the model was shown (enum, integer, number, array) is held to: the call is
    an error observation, as OpenAI's strict function calling refuses it."""
    env = Sorter()
    env.reset({}, 0)
    result = step(env, call("sort", **arguments))
    assert result.observation == f"<tool_response>\nerror: bad arguments for sort: {said}\n</tool_response>"
    assert not hasattr(env, "got") and result.info["tool_errors"] == 1


class Planner(ToolEnv):
    @tool
    def plan(self, span: Span, shelf: Shelf, path: Path | None = None) -> str:
        """Plan."""
        self.got = (span, shelf, path)
        return "planned"

    @tool
    def pick(self, mode: Mode, ranks: list[Rank], at: tuple[int, int], boxes: tuple[Box, ...] = ()) -> str:
        """Pick."""
        self.got = (mode, ranks, at, boxes)
        return "picked"

    def reset(self, task, seed):
        return "go"


def test_dataclass_and_pydantic_arguments_reach_the_tool_built_and_bad_ones_are_refused():
    env = Planner()
    env.reset({}, 0)
    shelf = {"a": [{"a": 1}, {"a": 2, "b": "y"}], "x": None}
    result = step(env, call("plan", span={"a": 3}, shelf=shelf, path={"a": [{"a": 1, "b": 2}]}))
    assert "planned" in result.observation and result.info["tool_errors"] == 0
    span, built, path = env.got
    assert span == {"a": 3}  # a TypedDict is a dict
    assert built == Shelf([Box(1), Box(2, "y")], None)
    assert path == Path(a=[Point(a=1.0, b=2)]) and isinstance(path.a[0], Point)
    wrong = [
        ({"span": {"a": 3, "c": 1}, "shelf": shelf}, "span must be an object with keys a: an integer; "
         "b (optional): a string or null (a Span), and no others ('c' is not one of them) (got {'a': 3, 'c': 1})"),
        ({"span": {"b": "x"}, "shelf": shelf}, "and no others (a is missing) (got {'b': 'x'})"),
        ({"span": {"a": "3"}, "shelf": shelf}, "and no others (a must be an integer, got '3') (got {'a': '3'})"),
        ({"span": {"a": 3}, "shelf": {"a": [{"a": "1"}]}}, "shelf must be an object with keys a: an array"),
        ({"span": {"a": 3}, "shelf": shelf, "path": {"a": [{"a": "1"}]}}, "path must be an object that Path validates (a.0.a: Input should be a valid number), or null"),
    ]  # fmt: skip
    for arguments, said in wrong:
        env.reset({}, 0)
        env.got = None
        result = step(env, call("plan", **arguments))
        assert said in result.observation and "error: bad arguments for plan: " in result.observation
        assert env.got is None and result.info["tool_errors"] == 1


def test_enum_and_tuple_parameters_show_their_values_and_shape_and_reach_the_tool_as_members_and_tuples():
    assert json_schema(Mode) == {"type": "string", "enum": ["a", "x"]}
    assert json_schema(Rank | None) == {"type": ["integer", "null"], "enum": [1, 2, None]}
    assert json_schema(tuple[int, str]) == {
        "type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}], "minItems": 2, "maxItems": 2,
    }  # fmt: skip
    assert json_schema(tuple[Box, ...]) == {"type": "array", "items": json_schema(Box)}
    assert json_schema(list | list[int]) == {
        "anyOf": [{"type": "array"}, {"type": "array", "items": {"type": "integer"}}]
    }

    class Perms(enum.Flag):  # a combination is no member: not checked
        R = 1
        W = 2

    assert json_schema(Perms) == {} and expected(Perms, 3) is None

    env = Planner()
    env.reset({}, 0)
    result = step(env, call("pick", mode="x", ranks=[2, 1], at=[3, 4], boxes=[{"a": 1}]))
    assert "picked" in result.observation and result.info["tool_errors"] == 0
    assert env.got == (Mode.X, [Rank.TWO, Rank.ONE], (3, 4), (Box(1),))
    assert type(env.got[1][0]) is Rank and type(env.got[2]) is tuple
    wrong = [
        ({"mode": "b", "ranks": [], "at": [1, 2]}, "mode must be one of 'a', 'x' (got 'b')"),
        ({"mode": "a", "ranks": [3], "at": [1, 2]}, "ranks must be an array whose items are each one of 1, 2 (got [3])"),
        ({"mode": "a", "ranks": [], "at": [1]}, "at must be an array of 2 items: an integer, then an integer (got [1])"),
        ({"mode": "a", "ranks": [], "at": [1, 2], "boxes": [{"a": "1"}]}, "boxes must be an array whose items are each an object"),
    ]  # fmt: skip
    for arguments, said in wrong:
        env.reset({}, 0)
        env.got = None
        result = step(env, call("pick", **arguments))
        assert said in result.observation and "error: bad arguments for pick: " in result.observation, (
            result.observation
        )
        assert env.got is None and result.info["tool_errors"] == 1


def test_arguments_that_fit_their_hints_reach_the_tool():
    env = Sorter()
    env.reset({}, 0)
    result = step(env, call("sort", order="desc", depth=None, scale=2, items=["b", "a"], note={"any": 1}))
    assert "sorted" in result.observation and result.info["tool_errors"] == 0
    assert env.got == ("desc", None, 2, ["b", "a"], {"any": 1})  # an int is a number; Any takes anything
    result = step(env, call("sort", order="asc", depth=2))
    assert env.got[:2] == ("asc", 2) and result.info["tool_errors"] == 0


def test_tool_env_exposes_only_marked_methods_as_tools():
    assert sorted(t["function"]["name"] for t in Calculator.tools) == ["add", "explode", "shout", "submit"]


def test_sync_and_async_tools_answer_with_tool_responses():
    env = Calculator()
    env.reset({}, 0)
    result = step(env, call("add", a=2, b=3) + call("shout", text="hi"))
    assert result.observation == "<tool_response>\n5\n</tool_response>\n<tool_response>\nHI\n</tool_response>"
    assert not result.done and result.info["tool_calls"] == 2 and result.info["turns"] == 1


def test_sync_tools_run_off_the_event_loop_thread():
    env = Calculator()
    env.reset({}, 0)

    async def play():
        await env.step(call("add", a=1, b=1))
        return threading.current_thread()

    loop_thread = asyncio.run(play())
    assert env.thread is not loop_thread


def test_unknown_tool_bad_arguments_and_failing_tool_become_error_observations():
    env = Calculator()
    env.reset({}, 0)
    result = step(env, call("nope") + call("add", a=1) + call("explode") + call("helper"))
    lines = [line for line in result.observation.splitlines() if line.startswith("error:")]
    assert lines[0].startswith("error: unknown tool 'nope'")
    assert lines[1].startswith("error: bad arguments for add")
    assert lines[2] == "error: explode failed: RuntimeError: boom"
    assert lines[3].startswith("error: unknown tool 'helper'")
    assert result.info["tool_errors"] == 4 and not result.done


def test_malformed_call_is_an_error_observation_not_a_crash():
    env = Calculator()
    env.reset({}, 0)
    result = step(env, "<tool_call>{oops</tool_call>")
    assert "error: tool call is not valid JSON" in result.observation and not result.done


def test_a_tool_can_end_the_episode_with_bookkeeping_in_info():
    env = Calculator()
    env.reset({}, 0)
    step(env, call("add", a=1, b=2))
    result = step(env, call("submit", value=42))
    assert result.done and result.reward == 1.0
    assert result.info["success"] is True and result.info["outcome"] == "success"
    assert result.info["turns"] == 2 and result.info["tool_calls"] == 2 and result.info["tool_seconds"] >= 0


def test_a_reply_without_tool_call_or_answer_asks_for_one():
    env = Calculator()
    env.reset({}, 0)
    result = step(env, "hmm")
    assert "<answer>" in result.observation and not result.done


def test_too_many_calls_in_one_turn_are_cut():
    env = Calculator()
    env.reset({}, 0)
    result = step(env, call("add", a=1, b=1) * (env.max_calls_per_turn + 3))
    assert result.info["tool_calls"] == env.max_calls_per_turn
    assert f"at most {env.max_calls_per_turn} tool calls" in result.observation


def test_long_tool_output_is_truncated():
    env = Calculator()
    env.reset({}, 0)
    result = step(env, call("shout", text="a" * (env.max_observation_chars + 100)))
    assert "[truncated 100 characters]" in result.observation


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system # Tools <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }} {{ m['content'] }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant {% endif %}"
)


def test_tool_schemas_render_through_a_chat_template():
    from forge.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    tokenizer.chat_template = HERMES_TEMPLATE
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "go"}],
        tools=Calculator.tools,
        add_generation_prompt=True,
        tokenize=False,
    )
    assert '"name": "add"' in text and '"description": "Add two integers."' in text


def test_hand_written_tool_schemas_are_kept():
    schema = {
        "type": "function",
        "function": {"name": "x", "parameters": {"type": "object", "properties": {}}},
    }

    class Manual(ToolEnv):
        tools = [schema]

    assert Manual.tools == [schema]


def test_grading_a_final_answer_runs_off_the_event_loop_thread():
    class Graded(ToolEnv):
        def score_answer(self, answer):
            return self.done(1.0, True, threading.current_thread().name)

    env = Graded()
    env.start_episode()

    async def play():
        return await env.step("<answer>x</answer>"), threading.current_thread().name

    result, loop_thread = asyncio.run(play())
    assert result.done and result.observation != loop_thread


def test_templates_that_ignore_tools_are_detected_and_get_a_hermes_prompt():
    from forge.env.tools import hermes_tools_prompt, template_renders_tools
    from forge.models.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    assert not template_renders_tools(tokenizer)
    tokenizer.chat_template = HERMES_TEMPLATE
    assert template_renders_tools(tokenizer)
    prompt = hermes_tools_prompt(Calculator.tools)
    assert '"name": "add"' in prompt and "<tool_call>" in prompt


def test_counters_restart_on_every_reset_without_the_subclass_asking():
    env = Calculator()
    env.reset({}, 0)
    step(env, call("add", a=1, b=1))
    env.reset({}, 1)
    assert env.info() == {"turns": 0, "tool_calls": 0, "tool_errors": 0, "tool_seconds": 0.0}


def test_a_sync_tool_given_up_on_while_looping_in_python_is_stopped():
    from forge.env.calls import Abandoned, EnvTimeout, call_env

    stopped: list[BaseException] = []

    class Spins(ToolEnv):
        def reset(self, task, seed):
            return "find it"

        @tool
        def search(self, query: str) -> str:
            """Search forever.

            Args:
                query: what to look for.
            """
            try:
                while query:
                    pass
            except BaseException as exc:  # what stopped it
                stopped.append(exc)
                raise
            return ""

    env = Spins()
    env.reset({}, 0)

    async def play() -> None:
        await call_env(env.step, call("search", query="x"), timeout_s=0.2)

    try:
        asyncio.run(play())
    except EnvTimeout:
        pass
    else:
        raise AssertionError("the step did not time out")
    deadline = time.monotonic() + 5
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stopped and isinstance(stopped[0], Abandoned)
