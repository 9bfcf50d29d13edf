"""Guided-decoding specs: what a request asks for (JSON schema, any JSON object, regex, choice) and
the regular expression outlines-core compiles for it. Validated when the request is built, so a
malformed schema or regex fails that request at once with the field named."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

# Imported here, once, not inside build_spec: outlines-core registers `outlines_core.json_schema` in
# sys.modules only at the end of its __init__, so `from outlines_core.json_schema import ...` in one
# thread while a compile thread is still importing outlines_core fails with ModuleNotFoundError.
from outlines_core.json_schema import build_regex_from_schema

from ..errors import InvalidParameterError

GUIDED_FIELDS = ("json_schema", "json_object", "regex", "choice")
MAX_REGEX_CHARS = 64_000
MAX_CHOICES = 1024
# Whitespace JSON output may contain between tokens: at most one space (outlines-core's default), so
# a model cannot stall a request by emitting whitespace forever.
JSON_WHITESPACE = r"[ ]?"
_REGEX_META = set(r"\.+*?()|[]{}^$#&-~/")

# json_object: any JSON object, as a regular expression with its nesting bounded (a regular expression
# cannot count brackets). The cost of compiling grows steeply with depth: the automaton holds one copy
# of the string, number and literal states for each place a value can stand, and every level multiplies
# those places. Measured with SmolLM2's 49k-token vocabulary (index build, 2-core machine): depth 1
# ~0.05 s, depth 2 ~0.3 s, depth 3 (outlines-core's generic object) ~7-8 s. Depth 2 lets the top object
# hold objects and arrays of plain values; deeper containers are not offered, so the model writes a plain
# value there and the output is still a JSON object.
JSON_OBJECT_MAX_DEPTH = 2
# Any character JSON allows unescaped (everything but '"', '\\' and controls), or a short escape.
JSON_STRING = r'"([^"\\\x00-\x1F]|\\["\\/bfnrt])*"'
JSON_NUMBER = r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?"
# Whitespace in json_object output: one optional space after ':' and ',' (json.dumps' layout) and none
# elsewhere: every optional space adds states to the automaton, and unbounded whitespace lets a small
# model loop on it.
JSON_SEPARATOR_SPACE = r"[ ]?"


def _json_object_of(value: str) -> str:
    member = f"{JSON_STRING}:{JSON_SEPARATOR_SPACE}{value}"
    return rf"\{{({member}(,{JSON_SEPARATOR_SPACE}{member})*)?\}}"


def _json_array_of(value: str) -> str:
    return rf"\[({value}(,{JSON_SEPARATOR_SPACE}{value})*)?\]"


def json_object_regex(max_depth: int = JSON_OBJECT_MAX_DEPTH) -> str:
    """A pattern for JSON objects whose containers nest at most max_depth deep (the object itself is
    depth 1)."""
    if max_depth < 1:
        raise ValueError("max_depth must be >= 1")
    value = f"({JSON_STRING}|{JSON_NUMBER}|true|false|null)"
    for _ in range(max_depth - 1):
        value = f"({value[1:-1]}|{_json_object_of(value)}|{_json_array_of(value)})"
    return _json_object_of(value)


JSON_OBJECT_REGEX = json_object_regex()


@dataclass(frozen=True)
class GuidedSpec:
    kind: str  # one of GUIDED_FIELDS
    regex: str


@dataclass(frozen=True)
class TriggeredSpec:
    """A pattern that applies from the point the output ends with `trigger` (say `<tool_call>`) until it
    is complete; the text before and after is free. regex: what follows the trigger, close included."""
    trigger: str
    regex: str


def escape_literal(text: str) -> str:
    """Escape regex metacharacters only (Rust's regex syntax rejects some escapes Python's re adds)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def build_spec(json_schema=None, json_object: bool = False, regex: str | None = None,
               choice: list[str] | None = None) -> GuidedSpec | None:
    given = [name for name, value in (("json_schema", json_schema), ("json_object", json_object),
                                      ("regex", regex), ("choice", choice)) if value]
    if not given:
        return None
    if len(given) > 1:
        raise InvalidParameterError(given[1], f"at most one guided-decoding field per request, got {given}")
    kind = given[0]
    if kind == "json_schema":
        if isinstance(json_schema, str):
            try:
                json_schema = json.loads(json_schema)
            except json.JSONDecodeError as exc:
                raise InvalidParameterError("json_schema", f"is not valid JSON: {exc}") from None
        if not isinstance(json_schema, dict):
            raise InvalidParameterError("json_schema", "must be a JSON object (a dict or its JSON text)")
        from .numbers import extract_numeric_bounds
        rewritten, ranges = extract_numeric_bounds(json_schema)
        try:
            pattern = build_regex_from_schema(json.dumps(rewritten), JSON_WHITESPACE)
        except Exception as exc:  # outlines-core raises ValueError/TypeError subclasses of its own
            raise InvalidParameterError("json_schema", f"cannot be compiled: {exc}") from None
        for placeholder, number_pattern in ranges.items():
            pattern = pattern.replace(placeholder, number_pattern)
    elif kind == "json_object":
        pattern = JSON_OBJECT_REGEX
    elif kind == "regex":
        if not isinstance(regex, str):
            raise InvalidParameterError("regex", f"must be a string, got {type(regex).__name__}")
        try:
            re.compile(regex)
        except re.error as exc:
            raise InvalidParameterError("regex", f"is not a valid regular expression: {exc}") from None
        pattern = regex
    else:
        if not isinstance(choice, (list, tuple)) or not all(isinstance(c, str) and c for c in choice):
            raise InvalidParameterError("choice", "must be a list of non-empty strings")
        if len(choice) > MAX_CHOICES:
            raise InvalidParameterError("choice", f"at most {MAX_CHOICES} choices, got {len(choice)}")
        pattern = "(" + "|".join(escape_literal(c) for c in choice) + ")"
    if len(pattern) > MAX_REGEX_CHARS:
        raise InvalidParameterError(kind, f"compiles to a {len(pattern)}-character pattern; the limit is "
                                          f"{MAX_REGEX_CHARS}")
    return GuidedSpec(kind=kind, regex=pattern)


def from_response_format(response_format: dict | None) -> dict:
    """OpenAI's `response_format` as SamplingParams keyword arguments."""
    if not response_format:
        return {}
    if not isinstance(response_format, dict):
        raise InvalidParameterError("response_format", "must be an object with a 'type'")
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_object": True}
    if kind == "json_schema":
        wrapper = response_format.get("json_schema") or {}
        schema = wrapper.get("schema", wrapper.get("schema_")) if isinstance(wrapper, dict) else None
        if schema is None:
            raise InvalidParameterError("response_format", "json_schema needs a 'schema'")
        return {"json_schema": schema}
    raise InvalidParameterError("response_format", f"type must be text, json_object or json_schema, got {kind!r}")
