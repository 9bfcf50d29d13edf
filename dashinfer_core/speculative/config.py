"""SpeculativeConfig: EngineConfig(speculative={...}) checked field by field.

{"method": "ngram", "num_speculative_tokens": k, "prompt_lookup_max": 4, "prompt_lookup_min": 2}
{"method": "draft", "model": path, "num_speculative_tokens": k, "quantization": ..., "dtype": ...}
"""
from __future__ import annotations

from dataclasses import dataclass, fields

from ..errors import InvalidParameterError

METHODS = ("ngram", "draft")
MAX_SPECULATIVE_TOKENS = 16  # a guided sequence rolls its FSM back over the drafts: outlines keeps 32 states
MAX_LOOKUP = 16


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram: the longest and shortest suffix of the tokens looked up earlier in the prompt and output
    prompt_lookup_max: int = 4
    prompt_lookup_min: int = 2
    # draft: an HF directory, a .gguf file or "default" (the embedded model); its quantization and dtype
    model: str | None = None
    quantization: str | None = None
    dtype: str = "auto"
    # Speculate only while at most this many sequences decode in a step: past it the forward is bound by
    # compute, not by reading the weights, and verifying k extra tokens per sequence costs more than it saves.
    disable_by_batch_size: int | None = 4

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig":
        if isinstance(value, SpeculativeConfig):
            return value
        if not isinstance(value, dict):
            raise InvalidParameterError("speculative", f"must be an object such as {{\"method\": \"ngram\", "
                                        f"\"num_speculative_tokens\": 4}}, got {value!r}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise InvalidParameterError(f"speculative.{unknown[0]}", f"unknown option; known: {sorted(known)}")
        for name in ("method", "num_speculative_tokens"):
            if name not in value:
                raise InvalidParameterError(f"speculative.{name}", "is required")
        config = cls(**value)
        config.check()
        return config

    def check(self) -> None:
        _check(self.method in METHODS, "method", f"must be one of {METHODS}, got {self.method!r}")
        _check(_is_int(self.num_speculative_tokens) and 1 <= self.num_speculative_tokens <= MAX_SPECULATIVE_TOKENS,
               "num_speculative_tokens", f"must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], "
               f"got {self.num_speculative_tokens!r}")
        _check(self.disable_by_batch_size is None or (_is_int(self.disable_by_batch_size)
                                                      and self.disable_by_batch_size >= 1),
               "disable_by_batch_size", f"must be unset or an integer >= 1, got {self.disable_by_batch_size!r}")
        if self.method == "ngram":
            _check(_is_int(self.prompt_lookup_min) and 1 <= self.prompt_lookup_min <= MAX_LOOKUP, "prompt_lookup_min",
                   f"must be an integer in [1, {MAX_LOOKUP}], got {self.prompt_lookup_min!r}")
            _check(_is_int(self.prompt_lookup_max) and self.prompt_lookup_min <= self.prompt_lookup_max <= MAX_LOOKUP,
                   "prompt_lookup_max", f"must be an integer in [prompt_lookup_min ({self.prompt_lookup_min}), "
                   f"{MAX_LOOKUP}], got {self.prompt_lookup_max!r}")
            for name in ("model", "quantization"):
                _check(getattr(self, name) is None, name, "is for method 'draft' only")
            _check(self.dtype == "auto", "dtype", "is for method 'draft' only")
        else:
            _check(isinstance(self.model, str) and bool(self.model), "model",
                   f"method 'draft' needs the draft model (a directory, a .gguf file or 'default'), got {self.model!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, name: str, message: str) -> None:
    if not ok:
        raise InvalidParameterError(f"speculative.{name}", message)
