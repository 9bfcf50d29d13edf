"""Numeric bounds for guided JSON.

outlines-core turns {"type": "integer", "minimum": 0, "maximum": 100} into "any integer", so a model
can write 12345678 and the output fails the schema. Before compiling, each bounded integer or number
in the schema is swapped for a placeholder constant, and in the compiled pattern that constant is
replaced by a regular expression that admits exactly the integers in range (for numbers: those
integers, and non-negative ones below the maximum with up to 6 decimals, a subset of the valid
values that is always valid).
"""
from __future__ import annotations

import math

PLACEHOLDER = "DASHINFERBOUND{}X"
_BOUND_KEYS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")


def _same_length(lo: str, hi: str) -> list[str]:
    """Alternatives matching exactly the digit strings lo..hi of one length (lo <= hi)."""
    if lo == hi:
        return [lo]
    if set(lo) == {"0"} and set(hi) == {"9"}:
        return ["[0-9]" * len(lo)]
    if len(lo) == 1:
        return [f"[{lo}-{hi}]"]
    if lo[0] == hi[0]:
        return [lo[0] + p for p in _same_length(lo[1:], hi[1:])]
    rest = len(lo) - 1
    parts = [lo[0] + p for p in _same_length(lo[1:], "9" * rest)]
    if int(hi[0]) - int(lo[0]) > 1:
        parts.append(f"[{int(lo[0]) + 1}-{int(hi[0]) - 1}]" + "[0-9]" * rest)
    parts += [hi[0] + p for p in _same_length("0" * rest, hi[1:])]
    return parts


def _nonneg_range(lo: int, hi: int) -> list[str]:
    """Alternatives matching exactly the decimal integers lo..hi (0 <= lo <= hi), no leading zeros."""
    parts = []
    for digits in range(len(str(lo)), len(str(hi)) + 1):
        a = max(lo, 10 ** (digits - 1) if digits > 1 else 0)
        b = min(hi, 10 ** digits - 1)
        if a <= b:
            parts += _same_length(str(a), str(b))
    return parts


def int_range_regex(lo: int | None, hi: int | None) -> str:
    """A regex for the integers in [lo, hi]; None = unbounded on that side."""
    alternatives = []
    # Non-negative part.
    if hi is None or hi >= 0:
        a = max(lo, 0) if lo is not None else 0
        if hi is None:
            digits = len(str(a))
            alternatives += _nonneg_range(a, 10 ** digits - 1) + [f"[1-9][0-9]{{{digits},}}"]
        elif a <= hi:
            alternatives += _nonneg_range(a, hi)
    # Negative part: -x for x in [max(1, -hi), -lo].
    if lo is None or lo < 0:
        b = max(1, -hi) if hi is not None else 1
        if lo is None:
            digits = len(str(b))
            negatives = _nonneg_range(b, 10 ** digits - 1) + [f"[1-9][0-9]{{{digits},}}"]
        else:
            negatives = _nonneg_range(b, -lo) if b <= -lo else []
        alternatives += ["-" + p for p in negatives]
    return "(" + "|".join(alternatives) + ")"


def number_range_regex(lo: float | None, hi: float | None, integer: bool) -> str:
    int_lo = None if lo is None else math.ceil(lo)
    int_hi = None if hi is None else math.floor(hi)
    whole = int_range_regex(int_lo, int_hi)
    if integer:
        return whole
    # Decimals only on non-negative integer parts below the maximum: k.f stays inside [lo, hi].
    frac_lo = max(int_lo if int_lo is not None else 0, 0)
    frac_hi = None if int_hi is None else int_hi - 1
    if frac_hi is not None and frac_hi < frac_lo:
        return whole
    return f"({whole}|{int_range_regex(frac_lo, frac_hi)}\\.[0-9]{{1,6}})"


def _bounds(node: dict) -> tuple[float | None, float | None]:
    lo, hi = node.get("minimum"), node.get("maximum")
    integer = node.get("type") == "integer"
    ex_lo, ex_hi = node.get("exclusiveMinimum"), node.get("exclusiveMaximum")
    if isinstance(ex_lo, bool):  # draft 4: a flag on minimum
        ex_lo = lo if ex_lo else None
    if isinstance(ex_hi, bool):
        ex_hi = hi if ex_hi else None
    if ex_lo is not None:
        bump = math.floor(ex_lo) + 1 if integer or float(ex_lo).is_integer() else math.ceil(ex_lo)
        lo = bump if lo is None else max(lo, bump)
    if ex_hi is not None:
        drop = math.ceil(ex_hi) - 1 if integer or float(ex_hi).is_integer() else math.floor(ex_hi)
        hi = drop if hi is None else min(hi, drop)
    return lo, hi


def extract_numeric_bounds(schema):
    """Copy of schema with bounded numbers replaced by placeholder constants, and
    {placeholder JSON literal: regex} to substitute into the compiled pattern."""
    replacements: dict[str, str] = {}

    def walk(node):
        if isinstance(node, list):
            return [walk(x) for x in node]
        if not isinstance(node, dict):
            return node
        if node.get("type") in ("integer", "number") and any(k in node for k in _BOUND_KEYS):
            lo, hi = _bounds(node)
            name = PLACEHOLDER.format(len(replacements))
            replacements[f'"{name}"'] = number_range_regex(lo, hi, node["type"] == "integer")
            return {"const": name}
        return {k: walk(v) for k, v in node.items()}

    return walk(schema), replacements
