"""A tool parameter's type hint, read once for both of its uses: the JSON schema the model is
shown (`json_schema`) and the check of the arguments a call brings (`argument_problem`), so
a call is refused exactly when it breaks the schema the model saw. A call that breaks it gets
an error observation, as OpenAI's strict function calling refuses it, instead of reaching the
tool with a value its code never expected.

What a hint states exactly is shown and checked: str, int, float (an int is a number too),
bool, list and dict (`list[X]`'s items and `dict[str, X]`'s values as X), a tuple (an array:
`tuple[X, ...]` of X, `tuple[X, Y]` of exactly those, in order), a `Literal` (its values,
`enum`), an `Enum` class (its members' values; the tool gets the member), `X | None` /
`Optional[X]` (null allowed) and unions of those (a list of types, or `anyOf`). A TypedDict or a dataclass is an object with its fields as keys (those
without a default required, no others), each held to its own hint; a dataclass parameter
gets an instance built from the object, a tuple parameter a tuple (`converted`). A pydantic model shows its own JSON
schema (its `$defs` written in place) and is checked, and built, by its strict JSON
validation. Any other hint (`Any`, a class of the env's own) and a parameter without one take
any value, and their schema is `{}`, JSON Schema's "any value"."""

from __future__ import annotations

import dataclasses
import enum
import inspect
import json
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
_NESTED = ("items", "positions", "fields", "model")  # the kinds with alternatives of their own


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


def converted(method: Any, arguments: dict[str, Any]) -> dict[str, Any]:
    """`arguments` (which `argument_problem` passed) as `method` takes them: a dataclass's or a
    pydantic model's object built into an instance, wherever it sits in the value."""
    try:
        hints = typing.get_type_hints(method)
    except Exception:
        return arguments
    return {name: _converted(_allowed(hints[name]), value) if name in hints else value
            for name, value in arguments.items()}  # fmt: skip


def expected(hint: Any, value: Any) -> str | None:
    """None when `value` fits `hint` (or the hint is one not checked); else what it must be."""
    return _refused(_allowed(hint), value)


def _refused(allowed: Any, value: Any) -> str | None:
    """`expected` for a hint already read into its alternatives."""
    if allowed is _UNCHECKED or any(fits(value, kind) for kind in allowed):
        return None
    return _either(allowed, value)


def _either(allowed: list[Any], value: Any = _UNCHECKED) -> str:
    """`allowed` in words; ", or " between alternatives where one has items of its own, so
    "an array whose items are each an integer, or null" is no array of optional integers.
    `value`, where given, is the one refused (a pydantic model says what it found wrong)."""
    nested = any(isinstance(kind, tuple) and kind[0] in _NESTED for kind in allowed)
    joiner = ", or " if nested and len(allowed) > 1 else " or "
    return joiner.join(describe(kind, value) for kind in allowed)


def _allowed(hint: Any, within: frozenset = frozenset()) -> Any:
    """The alternatives a hint allows: types checked, ("literal", values, the Enum class to
    build or None), ("items", list, dict or tuple, the alternatives each item or value allows),
    ("positions", the alternatives of each of a fixed tuple's items), ("fields", class, each field's
    alternatives, the required ones, the class to build or None), ("model", a pydantic model),
    or None (the value None); _UNCHECKED when any part is a hint not checked (an item hint not
    checked leaves the items so; a field's, that field). `within`: the classes whose fields are
    being read, so a class that holds itself is taken as not checked there."""
    if _is_model(hint):
        return [("model", hint)]
    if isinstance(hint, type) and (typing.is_typeddict(hint) or dataclasses.is_dataclass(hint)):
        return _fields(hint, within) if hint not in within else _UNCHECKED
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _members(hint)
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        alternatives: list[Any] = []
        for arg in typing.get_args(hint):
            inner = _allowed(arg, within)
            if inner is _UNCHECKED:
                return _UNCHECKED
            alternatives.extend(inner)
        return alternatives
    if hint is None or hint is type(None):
        return [None]
    if origin is typing.Literal:
        return [("literal", typing.get_args(hint), None)]
    if hint is tuple or origin is tuple:
        return _tuple(hint, within)
    if origin in (list, dict) and typing.get_args(hint):  # list[X], dict[str, X]: X checked too
        items = _allowed(typing.get_args(hint)[-1], within)
        return [origin] if items is _UNCHECKED else [("items", origin, items)]
    base = origin if origin in (list, dict) else hint
    return [base] if base in _KINDS else _UNCHECKED


def _members(cls: type[enum.Enum]) -> Any:
    """An Enum class's kind: its members' values, built back into the member. A Flag (whose
    combinations are no members) and values JSON has no type for are not checked."""
    values = tuple(member.value for member in cls)
    plain = all(value is None or type(value) in _JSON_TYPES for value in values)
    if issubclass(cls, enum.Flag) or not values or not plain:
        return _UNCHECKED
    return [("literal", values, cls)]


def _tuple(hint: Any, within: frozenset) -> Any:
    """A tuple's kind: a JSON array, built into a tuple. `tuple[X, ...]` (and a bare `tuple`,
    whose items are any value) as ("items", tuple, X); `tuple[X, Y]` as ("positions", [X, Y]),
    `tuple[()]` as ("positions", [])."""
    args = typing.get_args(hint)
    if hint in (tuple, typing.Tuple) or (len(args) == 2 and args[1] is Ellipsis):  # noqa: UP006
        return [("items", tuple, _allowed(args[0], within) if args else _UNCHECKED)]
    return [("positions", [_allowed(arg, within) for arg in args if arg != ()])]


def _is_model(hint: Any) -> bool:
    """A pydantic model class (pydantic is not imported for it)."""
    return (
        isinstance(hint, type)
        and callable(getattr(hint, "model_json_schema", None))
        and callable(getattr(hint, "model_validate_json", None))
    )


def _fields(cls: type, within: frozenset) -> Any:
    try:
        hints = typing.get_type_hints(cls, include_extras=True)
    except Exception:  # a field's hint that does not resolve: the object is not checked
        return _UNCHECKED
    if typing.is_typeddict(cls):
        # A hint written as a string (postponed annotations) hides NotRequired from the class's
        # own __required_keys__: the resolved hints say it.
        marked = {name: typing.get_origin(hint) for name, hint in hints.items()}
        required = frozenset(
            name
            for name in hints
            if marked[name] is typing.Required
            or (name in cls.__required_keys__ and marked[name] is not typing.NotRequired)
        )
        names, make = list(hints), None
    else:
        fields = [field for field in dataclasses.fields(cls) if field.init]
        names = [field.name for field in fields]
        empty = dataclasses.MISSING
        required = frozenset(f.name for f in fields if f.default is empty and f.default_factory is empty)
        make = cls
    inner = within | {cls}
    return [
        (
            "fields",
            cls,
            {name: _allowed(_bare(hints.get(name, Any)), inner) for name in names},
            required,
            make,
        )
    ]


def _bare(hint: Any) -> Any:
    """A field's hint without Required, NotRequired or Annotated around it."""
    while typing.get_origin(hint) in (typing.Required, typing.NotRequired, typing.Annotated):
        hint = typing.get_args(hint)[0]
    return hint


def _converted(allowed: Any, value: Any) -> Any:
    if allowed is _UNCHECKED:
        return value
    kind = next((kind for kind in allowed if fits(value, kind)), None)
    if not isinstance(kind, tuple):
        return value
    if kind[0] == "literal":
        _, _, make = kind
        return value if make is None else make(value)
    if kind[0] == "items":
        _, container, items = kind
        if container is dict:
            return {key: _converted(items, item) for key, item in value.items()}
        return container(_converted(items, item) for item in value)
    if kind[0] == "positions":
        return tuple(_converted(items, item) for items, item in zip(kind[1], value, strict=True))
    if kind[0] == "fields":
        _, _, fields, _, make = kind
        made = {key: _converted(fields[key], item) for key, item in value.items()}
        return make(**made) if make is not None else made
    if kind[0] == "model":
        return kind[1].model_validate_json(json.dumps(value), strict=True)
    return value


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
    types_ = [part.get("type") for part in parts]
    distinct = all(isinstance(kind, str) for kind in types_) and len(types_) == len(set(types_))
    if "enum" not in keywords and "anyOf" not in keywords and distinct:
        # Types, each once with its own keywords (items, additionalProperties apply to their type only).
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
    if isinstance(kind, tuple) and kind[0] == "fields":
        _, _, fields, required, _ = kind
        return {
            "type": "object",
            "properties": {name: _schema(allowed) for name, allowed in fields.items()},
            "required": [name for name in fields if name in required],
            "additionalProperties": False,
        }
    if isinstance(kind, tuple) and kind[0] == "model":
        schema = kind[1].model_json_schema()
        return _in_place(schema, schema.pop("$defs", {}), ())
    if isinstance(kind, tuple) and kind[0] == "items":
        _, container, items = kind
        if container is dict:
            return {"type": "object", "additionalProperties": _schema(items)}
        return {"type": "array", "items": _schema(items)} if items is not _UNCHECKED else {"type": "array"}
    if isinstance(kind, tuple) and kind[0] == "positions":
        size = len(kind[1])
        if not size:
            return {"type": "array", "maxItems": 0}
        return {"type": "array", "prefixItems": [_schema(items) for items in kind[1]], "minItems": size,
                "maxItems": size}  # fmt: skip
    if isinstance(kind, tuple):
        values = list(kind[1])
        kinds = {_value_type(value) for value in values}
        return {"type": kinds.pop(), "enum": values} if len(kinds) == 1 else {"enum": values}
    return {"type": _JSON_TYPES[kind]}


def _fields_problem(fields: dict[str, Any], required: frozenset, value: dict) -> str | None:
    """The first thing wrong with an object for these fields: a key missing or unknown, or a
    value its field's hint rules out."""
    missing = [name for name in fields if name in required and name not in value]
    if missing:
        return f"{missing[0]} is missing"
    unknown = [key for key in value if key not in fields]
    if unknown:
        return f"{unknown[0]!r} is not one of them"
    for key, item in value.items():
        wanted = _refused(fields[key], item)
        if wanted is not None:
            return f"{key} must be {wanted}, got {item!r}"
    return None


def _model_problems(model: Any, value: Any) -> str:
    """What a pydantic model's strict validation finds wrong with `value` (its first three
    errors, each at its key path), or, with no value, the keys it takes."""
    if value is not _UNCHECKED:
        try:
            model.model_validate_json(json.dumps(value), strict=True)
        except ValueError as exc:
            errors = exc.errors() if callable(getattr(exc, "errors", None)) else []
            found = [
                f"{'.'.join(map(str, e.get('loc', ()))) or 'the value'}: {e.get('msg', '')}" for e in errors
            ]
            if found:
                return "; ".join(found[:3]) + ("; ..." if len(found) > 3 else "")
    schema = _schema_of(("model", model))
    required = set(schema.get("required", []))
    keys = [f"{name}{'' if name in required else ' (optional)'}" for name in schema.get("properties", {})]
    return "keys " + ", ".join(keys)


def _in_place(schema: Any, defs: dict[str, Any], seen: tuple[str, ...]) -> Any:
    """`schema` with each `{"$ref": "#/$defs/Name"}` replaced by that definition, so that it
    stands anywhere in a tool's parameters; a model that holds itself is any value there."""
    if isinstance(schema, list):
        return [_in_place(part, defs, seen) for part in schema]
    if not isinstance(schema, dict):
        return schema
    ref = schema.get("$ref")
    if isinstance(ref, str) and ref.startswith("#/$defs/"):
        name = ref.removeprefix("#/$defs/")
        rest = {key: value for key, value in schema.items() if key != "$ref"}
        if name in seen or name not in defs:
            return rest
        return {**_in_place(defs[name], defs, (*seen, name)), **_in_place(rest, defs, seen)}
    return {key: _in_place(value, defs, seen) for key, value in schema.items()}


def _value_type(value: Any) -> str:
    """The JSON type of a `Literal`'s value (None: null; an Enum member or other: string)."""
    return "null" if value is None else _JSON_TYPES.get(type(value), "string")


def _merged(kinds: Any) -> str | list[str]:
    unique = list(dict.fromkeys(kinds))
    return unique[0] if len(unique) == 1 else unique


def fits(value: Any, kind: Any) -> bool:
    if kind is None:
        return value is None
    if isinstance(kind, tuple) and kind[0] == "items":  # a list's or tuple's items, a dict's values
        _, container, items = kind
        if not isinstance(value, dict if container is dict else list):  # JSON's arrays are lists
            return False
        return all(_refused(items, item) is None for item in (value.values() if container is dict else value))
    if isinstance(kind, tuple) and kind[0] == "positions":
        return (
            isinstance(value, list)
            and len(value) == len(kind[1])
            and all(_refused(items, item) is None for items, item in zip(kind[1], value, strict=True))
        )
    if isinstance(kind, tuple) and kind[0] == "fields":
        _, _, fields, required, _ = kind
        return isinstance(value, dict) and _fields_problem(fields, required, value) is None
    if isinstance(kind, tuple) and kind[0] == "model":
        try:
            kind[1].model_validate_json(json.dumps(value), strict=True)
        except ValueError:  # pydantic's ValidationError is a ValueError
            return False
        return True
    if isinstance(kind, tuple):  # a Literal's values: equal and of the same type (True is no 1)
        return any(value == option and type(value) is type(option) for option in kind[1])
    if isinstance(value, bool) and kind is not bool:  # JSON's true is no integer, nor a number
        return False
    return isinstance(value, _KINDS[kind])


def describe(kind: Any, value: Any = _UNCHECKED) -> str:
    """`kind` in words; for a pydantic model and a refused `value`, what its validation found."""
    if kind is None:
        return "null"
    if isinstance(kind, tuple) and kind[0] == "fields":
        _, cls, fields, required, _ = kind
        parts = [f"{name}{'' if name in required else ' (optional)'}: "
                 f"{'any value' if allowed is _UNCHECKED else _either(allowed)}" for name, allowed in fields.items()]  # fmt: skip
        found = _fields_problem(fields, required, value) if isinstance(value, dict) else None
        return f"an object with keys {'; '.join(parts)} (a {cls.__name__}), and no others" + (
            f" ({found})" if found else ""
        )
    if isinstance(kind, tuple) and kind[0] == "model":
        return f"an object that {kind[1].__name__} validates ({_model_problems(kind[1], value)})"
    if isinstance(kind, tuple) and kind[0] == "items":
        _, container, items = kind
        if items is _UNCHECKED:
            return _NAMES[list]
        whose = "an object whose values are" if container is dict else "an array whose items are"
        inner = _either(items)
        return f"{whose} each {f'({inner})' if len(items) > 1 else inner}"
    if isinstance(kind, tuple) and kind[0] == "positions":
        if not kind[1]:
            return "an empty array"
        each = [f"({_either(items)})" if items is not _UNCHECKED and len(items) > 1 else
                "any value" if items is _UNCHECKED else _either(items) for items in kind[1]]  # fmt: skip
        return f"an array of {len(each)} item{'s' if len(each) > 1 else ''}: " + ", then ".join(each)
    if isinstance(kind, tuple):
        return "one of " + ", ".join(repr(option) for option in kind[1])
    return _NAMES[kind]
