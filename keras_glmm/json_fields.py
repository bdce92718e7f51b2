"""Checking a JSON document's fields by name and type, and decoding them as they are checked.

A check is a function ``(value, path) -> value``: it returns the value (or what
it decodes to) or raises :class:`FieldError` naming the field's path
(``"random[0].coding.rhs"``), what was expected and what came. Objects are
closed: :func:`object_of` refuses an unknown field and a missing one, so a
document holds exactly what its schema says. Nothing here evaluates anything.
"""

from __future__ import annotations

import math
from typing import Any, Callable

__all__ = [
    "Check", "FieldError", "boolean", "fields_of", "finite", "integer", "invalid", "list_of", "map_of",
    "matrix", "nullable", "numbers", "object_of", "one_of", "string", "strings",
]


class FieldError(ValueError):
    """A field of a document that is unknown, missing or of the wrong type (the message names it)."""


Check = Callable[[Any, str], Any]


def invalid(path: str, expected: str, value: Any) -> FieldError:
    shown = repr(value)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    return FieldError(f"field '{path}' must be {expected}, got {shown}")


def string(value: Any, path: str) -> str:
    if not isinstance(value, str):
        raise invalid(path, "a string", value)
    return value


def boolean(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise invalid(path, "true or false", value)
    return value


def integer(value: Any, path: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(path, "an integer", value)
    return value


def finite(value: Any, path: str) -> float | int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise invalid(path, "a finite number", value)
    return value


def one_of(*choices: Any) -> Check:
    def check(value, path):
        if value not in choices or isinstance(value, bool) != any(isinstance(c, bool) for c in choices):
            raise invalid(path, "one of " + ", ".join(repr(c) for c in choices), value)
        return value
    return check


def nullable(check: Check) -> Check:
    return lambda value, path: None if value is None else check(value, path)


def list_of(check: Check) -> Check:
    def checked(value, path):
        if not isinstance(value, list):
            raise invalid(path, "a list", value)
        return [check(v, f"{path}[{i}]") for i, v in enumerate(value)]
    return checked


def map_of(check: Check) -> Check:
    def checked(value, path):
        if not isinstance(value, dict):
            raise invalid(path, "an object", value)
        return {string(k, f"{path} key"): check(v, f"{path}.{k}") for k, v in value.items()}
    return checked


def fields_of(value: Any, path: str, fields: dict[str, Check], optional: tuple[str, ...] = ()) -> dict[str, Any]:
    """``value`` as an object of exactly ``fields`` (``optional`` ones may be absent), each checked."""
    if not isinstance(value, dict):
        raise invalid(path or "the document", "an object", value)
    prefix = f"{path}." if path else ""
    for key in value:
        if key not in fields:
            raise FieldError(
                f"unknown field '{prefix}{key}' (the format has {sorted(fields)} there)")
    for key in fields:
        if key not in value and key not in optional:
            raise FieldError(f"missing field '{prefix}{key}'")
    return {key: check(value[key], prefix + key) for key, check in fields.items() if key in value}


def object_of(fields: dict[str, Check], optional: tuple[str, ...] = ()) -> Check:
    return lambda value, path: fields_of(value, path, fields, optional)


strings = list_of(string)
numbers = list_of(finite)
matrix = list_of(numbers)
