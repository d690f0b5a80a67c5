"""Converting API dataclasses to and from their JSON/YAML wire form.

``from_wire`` is also the operator-side validator: it applies defaults, checks types,
enums, bounds and the cross-field rules, and reports every problem with the field's path
(``spec.gates.minAccuracy: must be <= 1``). The API server applies the same schema from
the generated CRD; this parser makes the embedded mode (no API server) just as strict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import types
import typing
from typing import Any

from kompressor.api.fields import Bounds, camel

_PRIMITIVES = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}


class SpecError(ValueError):
    """A manifest that does not fit the API. ``problems`` lists ``(path, message)``."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        super().__init__("; ".join(f"{path}: {message}" for path, message in problems))


@dataclasses.dataclass(frozen=True)
class FieldInfo:
    name: str
    wire: str
    hint: Any
    optional: bool
    required: bool
    description: str
    bounds: Bounds
    field: dataclasses.Field


@functools.cache
def fields_of(cls: type) -> tuple[FieldInfo, ...]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        optional = _is_optional(hint)
        if optional:
            hint = _strip_none(hint)
        out.append(FieldInfo(
            name=f.name, wire=f.metadata.get("wire") or camel(f.name), hint=hint, optional=optional,
            required=f.metadata.get("required", False), description=f.metadata.get("description", ""),
            bounds=f.metadata.get("bounds", Bounds()), field=f,
        ))
    return tuple(out)


def _is_optional(hint: Any) -> bool:
    return isinstance(hint, types.UnionType) and type(None) in typing.get_args(hint)


def _strip_none(hint: Any) -> Any:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    return args[0]


def to_wire(obj: Any) -> Any:
    """A dataclass tree as plain JSON data with camelCase keys; None fields are left out."""
    if dataclasses.is_dataclass(obj):
        out = {}
        for info in fields_of(type(obj)):
            value = getattr(obj, info.name)
            if value is not None:
                out[info.wire] = to_wire(value)
        return out
    if isinstance(obj, list):
        return [to_wire(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_wire(v) for k, v in obj.items()}
    return obj


def from_wire(cls: type, data: Any, path: str = "spec") -> Any:
    """Parse and validate wire data into ``cls``; raise SpecError naming every bad field."""
    problems: list[tuple[str, str]] = []
    result = _parse(cls, data, path, problems, Bounds())
    if not problems:
        from kompressor.api.rules import check_rules

        problems.extend(check_rules(cls, result, path))
    if problems:
        raise SpecError(problems)
    return result


def _parse(hint: Any, data: Any, path: str, problems: list, bounds: Bounds) -> Any:
    if dataclasses.is_dataclass(hint):
        return _parse_object(hint, data, path, problems)
    origin = typing.get_origin(hint)
    if origin is list:
        return _parse_list(typing.get_args(hint)[0], data, path, problems, bounds)
    if hint is dict or origin is dict:
        return _parse_map(hint, data, path, problems, bounds)
    return _parse_scalar(hint, data, path, problems, bounds)


def _parse_object(cls: type, data: Any, path: str, problems: list) -> Any:
    if not isinstance(data, dict):
        problems.append((path, f"must be an object, got {_kind(data)}"))
        return None
    known = {info.wire: info for info in fields_of(cls)}
    for key in data:
        if key not in known:
            hint = _closest(key, known)
            problems.append((f"{path}.{key}", "unknown field" + (f" (did you mean {hint}?)" if hint else "")))
    kwargs = {}
    for wire, info in known.items():
        sub = f"{path}.{wire}"
        if wire not in data or data[wire] is None:
            if info.required:
                problems.append((sub, "required field is missing"))
            continue
        kwargs[info.name] = _parse(info.hint, data[wire], sub, problems, info.bounds)
    if any(p[0] == path or p[0].startswith(path + ".") or p[0].startswith(path + "[") for p in problems):
        # Build what we can so that later fields are still checked; callers see SpecError anyway.
        try:
            return cls(**kwargs)
        except TypeError:
            return None
    return cls(**kwargs)


def _parse_list(item: Any, data: Any, path: str, problems: list, bounds: Bounds) -> Any:
    if not isinstance(data, list):
        problems.append((path, f"must be a list, got {_kind(data)}"))
        return None
    if bounds.min_items is not None and len(data) < bounds.min_items:
        problems.append((path, f"must have at least {bounds.min_items} item(s)"))
    if bounds.max_items is not None and len(data) > bounds.max_items:
        problems.append((path, f"must have at most {bounds.max_items} items"))
    if bounds.free_form:
        for i, v in enumerate(data):
            if not isinstance(v, dict):
                problems.append((f"{path}[{i}]", f"must be an object, got {_kind(v)}"))
        return list(data)
    item_bounds = Bounds(minimum=bounds.item_minimum)
    return [_parse(item, v, f"{path}[{i}]", problems, item_bounds) for i, v in enumerate(data)]


def _parse_map(hint: Any, data: Any, path: str, problems: list, bounds: Bounds) -> Any:
    if not isinstance(data, dict):
        problems.append((path, f"must be an object, got {_kind(data)}"))
        return None
    args = typing.get_args(hint)
    if bounds.free_form or not args:
        return dict(data)
    value_hint = args[1]
    return {str(k): _parse(value_hint, v, f"{path}.{k}", problems, Bounds()) for k, v in data.items()}


def _parse_scalar(hint: Any, data: Any, path: str, problems: list, bounds: Bounds) -> Any:
    if hint is float and isinstance(data, int) and not isinstance(data, bool):
        data = float(data)
    if hint is Any:
        return data
    if not isinstance(data, hint) or (hint is int and isinstance(data, bool)):
        problems.append((path, f"must be {_PRIMITIVES.get(hint, hint.__name__)}, got {_kind(data)}"))
        return None
    if isinstance(data, float) and not math.isfinite(data):
        problems.append((path, "must be a finite number"))
        return None
    _check_bounds(data, path, problems, bounds)
    return data


def _check_bounds(value: Any, path: str, problems: list, b: Bounds) -> None:
    if b.enum is not None and value not in b.enum:
        problems.append((path, f"must be one of {', '.join(map(str, b.enum))}; got {value!r}"))
    if b.minimum is not None:
        if value < b.minimum or (b.exclusive_minimum and value == b.minimum):
            problems.append((path, f"must be {'>' if b.exclusive_minimum else '>='} {b.minimum:g}; got {value!r}"))
    if b.maximum is not None:
        if value > b.maximum or (b.exclusive_maximum and value == b.maximum):
            problems.append((path, f"must be {'<' if b.exclusive_maximum else '<='} {b.maximum:g}; got {value!r}"))
    if b.min_length is not None and len(value) < b.min_length:
        problems.append((path, f"must be at least {b.min_length} character(s) long"))
    if b.max_length is not None and len(value) > b.max_length:
        problems.append((path, f"must be at most {b.max_length} characters long"))
    if b.pattern is not None and not re.search(_go_pattern(b.pattern), value):
        problems.append((path, f"{value!r} is not an accepted form (pattern {b.pattern})"))


@functools.cache
def _go_pattern(pattern: str) -> str:
    """The CRD's pattern as the API server (Go regexp) reads it: there `$` matches only at the
    very end, while Python's `$` also matches before a trailing newline ("builtin://x\\n")."""
    return re.sub(r"(?<!\\)\$", r"\\Z", pattern)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)


def _closest(key: str, known: dict) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, list(known), n=1, cutoff=0.75)
    return match[0] if match else None
