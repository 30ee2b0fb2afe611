"""A tool call's arguments checked against the type hints of the method it calls: the schema
the model was shown says `integer`, `string`, or one of a `Literal`'s values (`enum`), and a
call that breaks it gets an error observation, as OpenAI's strict function calling refuses it,
instead of reaching the tool with a value its code never expected.

Only what a hint states exactly is checked: str, int, float (an int is a number too), bool,
list, dict (their item types are not), a `Literal`, `X | None` / `Optional[X]` (None allowed)
and unions of those. Any other hint (`Any`, a class of the env's own) and a parameter without
one take any value, as before."""

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
    return " or ".join(describe(kind) for kind in allowed)


def _allowed(hint: Any) -> Any:
    """The alternatives a hint allows: types checked, ("literal", values), or None (the value
    None); _UNCHECKED when any part is a hint not checked."""
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
    base = origin if origin in (list, dict) else hint
    return [base] if base in _KINDS else _UNCHECKED


def fits(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if isinstance(kind, tuple):  # a Literal's values: equal and of the same type (True is no 1)
        return any(value == option and type(value) is type(option) for option in kind[1])
    if isinstance(value, bool) and kind is not bool:  # JSON's true is no integer, nor a number
        return False
    return isinstance(value, _KINDS[kind])


def describe(kind: Any) -> str:
    if kind is None:
        return "null"
    if isinstance(kind, tuple):
        return "one of " + ", ".join(repr(option) for option in kind[1])
    return _NAMES[kind]
