"""Guided-decoding specs: what a request asks for (JSON schema, any JSON object, regex, choice) and
the regular expression outlines-core compiles for it. Validated when the request is built, so a
malformed schema or regex fails that request at once with the field named."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

from ..errors import InvalidParameterError

GUIDED_FIELDS = ("json_schema", "json_object", "regex", "choice")
MAX_REGEX_CHARS = 64_000
MAX_CHOICES = 1024
# Whitespace JSON output may contain between tokens: at most one space (outlines-core's default), so
# a model cannot stall a request by emitting whitespace forever.
JSON_WHITESPACE = r"[ ]?"
_REGEX_META = set(r"\.+*?()|[]{}^$#&-~/")


@dataclass(frozen=True)
class GuidedSpec:
    kind: str  # one of GUIDED_FIELDS
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
    from outlines_core.json_schema import build_regex_from_schema
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
        pattern = build_regex_from_schema(json.dumps({"type": "object"}), JSON_WHITESPACE)
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
