"""A tool parameter's type hint, read once for both of its uses: the JSON schema the model is
shown (`json_schema`) and the check of the arguments a call brings (`argument_problem`), so
a call is refused exactly when it breaks the schema the model saw. A call that breaks it gets
an error observation, as OpenAI's strict function calling refuses it, instead of reaching the
tool with a value its code never expected.

What a hint states exactly is shown and checked: str, int, float (an int is a number too),
bool, list and dict (`list[X]`'s items and `dict[str, X]`'s values as X), a `Literal` (its
values, `enum`), `X | None` / `Optional[X]` (null allowed) and unions of those (a list of
types, or `anyOf`). Any other hint (`Any`, a class of the env's own) and a parameter without
one take any value, and their schema is `{}`, JSON Schema's "any value"."""

from __future__ import annotations

import inspect
import types
import typing
from typing import Any, Union

_KINDS: dict[Any, tuple[type, ...]] = {
    str: (str,),
    int: (int,),
    float: (int, float),
    bool: (bool,),
    list: (list,),
    dict: (dict,),
}
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false", list: "an array",
          dict: "an object"}  # fmt: skip
_UNCHECKED = object()


def argument_problem(method: Any, arguments: dict[str, Any]) -> str | None:
    """What is wrong with `arguments` for `method` (bound), or None: a name it does not take,
    a required one missing, or a value its hint rules out."""
    signature = inspect.signature(method)
    try:
        signature.bind(**arguments)
    except TypeError as exc:
        return str(exc)
    try:
        hints = typing.get_type_hints(method)
    except Exception:  # a hint that does not resolve: the signature is all that can be checked
        return None
    for name, value in arguments.items():
        if name in hints:
            wanted = expected(hints[name], value)
            if wanted is not None:
                return f"{name} must be {wanted} (got {value!r})"
    return None


def expected(hint: Any, value: Any) -> str | None:
    """None when `value` fits `hint` (or the hint is one not checked); else what it must be."""
    allowed = _allowed(hint)
    if allowed is _UNCHECKED or any(fits(value, kind) for kind in allowed):
        return None
    return _either(allowed)


def _either(allowed: list[Any]) -> str:
    """`allowed` in words; ", or " between alternatives where one has items of its own, so
    "an array whose items are each an integer, or null" is no array of optional integers."""
    nested = any(isinstance(kind, tuple) and kind[0] == "items" for kind in allowed)
    return (", or " if nested and len(allowed) > 1 else " or ").join(describe(kind) for kind in allowed)


def _allowed(hint: Any) -> Any:
    """The alternatives a hint allows: types checked, ("literal", values), ("items", list or
    dict, the alternatives each item or value allows), or None (the value None); _UNCHECKED
    when any part is a hint not checked (an item hint not checked leaves the items so)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        alternatives: list[Any] = []
        for arg in typing.get_args(hint):
            inner = _allowed(arg)
            if inner is _UNCHECKED:
                return _UNCHECKED
            alternatives.extend(inner)
        return alternatives
    if hint is None or hint is type(None):
        return [None]
    if origin is typing.Literal:
        return [("literal", typing.get_args(hint))]
    if origin in (list, dict) and typing.get_args(hint):  # list[X], dict[str, X]: X checked too
        items = _allowed(typing.get_args(hint)[-1])
        return [origin] if items is _UNCHECKED else [("items", origin, items)]
    base = origin if origin in (list, dict) else hint
    return [base] if base in _KINDS else _UNCHECKED


def json_schema(hint: Any) -> dict[str, Any]:
    """The JSON schema of the values `hint` allows: `{"type": ...}` (a list of types for a
    union or an optional), a `Literal`'s values as `enum` typed by them (so `Literal[1, 2]` is
    no string), `anyOf` where values and types mix, `{}` for a hint not checked."""
    return _schema(_allowed(hint))


def _schema(allowed: Any) -> dict[str, Any]:
    if allowed is _UNCHECKED:
        return {}
    parts = [_schema_of(kind) for kind in allowed]
    if len(parts) == 1:
        return parts[0]
    keywords = [key for part in parts for key in part if key != "type"]
    if "enum" not in keywords and "anyOf" not in keywords and len(keywords) == len(set(keywords)):
        # Types, each with its own keywords (items, additionalProperties apply to their type only).
        kinds = _merged(part["type"] for part in parts)
        return {
            "type": kinds,
            **{key: value for part in parts for key, value in part.items() if key != "type"},
        }
    if all("enum" in part or part == {"type": "null"} for part in parts):  # only values
        values = [value for part in parts for value in part.get("enum", [None])]
        kinds = _merged(_value_type(value) for value in values)
        return {"type": kinds, "enum": values}
    return {"anyOf": parts}


def _schema_of(kind: Any) -> dict[str, Any]:
    if kind is None:
        return {"type": "null"}
    if isinstance(kind, tuple) and kind[0] == "items":
        _, container, items = kind
        if container is list:
            return {"type": "array", "items": _schema(items)}
        return {"type": "object", "additionalProperties": _schema(items)}
    if isinstance(kind, tuple):
        values = list(kind[1])
        kinds = {_value_type(value) for value in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}
    return {"type": _JSON_TYPES[kind]}


def _value_type(value: Any) -> str:
    """The JSON type of a `Literal`'s value (None: null; an Enum member or other: string)."""
    return "null" if value is None else _JSON_TYPES.get(type(value), "string")


def _merged(kinds: Any) -> str | list[str]:
    unique = list(dict.fromkeys(kinds))
    return unique[0] if len(unique) == 1 else unique


def fits(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if isinstance(kind, tuple) and kind[0] == "items":  # a list's items, a dict's values
        _, container, items = kind
        if not isinstance(value, container):
            return False
        return all(
            any(fits(item, k) for k in items) for item in (value if container is list else value.values())
        )
    if isinstance(kind, tuple):  # a Literal's values: equal and of the same type (True is no 1)
        return any(value == option and type(value) is type(option) for option in kind[1])
    if isinstance(value, bool) and kind is not bool:  # JSON's true is no integer, nor a number
        return False
    return isinstance(value, _KINDS[kind])


def describe(kind: Any) -> str:
    if kind is None:
        return "null"
    if isinstance(kind, tuple) and kind[0] == "items":
        _, container, items = kind
        whose = "an array whose items are" if container is list else "an object whose values are"
        inner = _either(items)
        return f"{whose} each {f'({inner})' if len(items) > 1 else inner}"
    if isinstance(kind, tuple):
        return "one of " + ", ".join(repr(option) for option in kind[1])
    return _NAMES[kind]
