"""Command-line flags for EngineConfig, generated from its fields: names, defaults, choices and help
live once, in config.py, and the CLI and the FastChat worker both offer every engine option.

A field `max_num_seqs` becomes `--max-num-seqs`; a bool becomes `--name / --no-name`; `X | None`
fields default to unset (None).
"""
from __future__ import annotations

import argparse
import typing
from dataclasses import MISSING, fields

from .config import EngineConfig

_TYPES = {int: int, float: float, str: str}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (),
                    title: str = "engine") -> argparse._ArgumentGroup:
    """One flag per EngineConfig field (except those in `skip` and those marked flag=False)."""
    group = parser.add_argument_group(title)
    hints = typing.get_type_hints(EngineConfig)
    offered = [f.name for f in fields(EngineConfig) if f.name not in skip and f.metadata.get("flag", True)]
    # Which parsed values are engine options: a skipped name may be another flag's (generate's --seed).
    parser.set_defaults(engine_options=offered)
    for f in fields(EngineConfig):
        if f.name not in offered:
            continue
        default = f.default if f.default is not MISSING else None
        help_text = f.metadata.get("help", "")
        if hints[f.name] is bool:
            group.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=f"{help_text} (default: {'on' if default else 'off'})")
            continue
        args = [a for a in typing.get_args(hints[f.name]) if a is not type(None)] or [hints[f.name]]
        kind = f.metadata.get("parse") or _TYPES[args[0]]
        choices = f.metadata.get("choices")
        shown = "unset" if default is None else repr(default)
        group.add_argument(_flag(f.name), dest=f.name, type=kind, default=default,
                           choices=list(choices) if choices else None, help=f"{help_text} (default: {shown})")
    return group


def engine_config_from_args(args: argparse.Namespace, **overrides) -> EngineConfig:
    """The EngineConfig of parsed flags (fields without a flag keep their defaults, or `overrides`)."""
    values = {name: getattr(args, name) for name in args.engine_options}
    values.update(overrides)
    return EngineConfig(**values)
