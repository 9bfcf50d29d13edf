"""SamplingParams: how one request samples and when it stops; validated on construction."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from .errors import InvalidParameterError

# Below this temperature a request is greedy (argmax), as in vLLM.
GREEDY_TEMPERATURE = 1e-5
MAX_N = 128
MAX_STOP_STRINGS = 64
MAX_STOP_STRING_CHARS = 512
MAX_STOP_TOKEN_IDS = 1024


@dataclass
class SamplingParams:
    n: int = 1
    max_tokens: int = 16
    # Tokens that must be produced before EOS / stop token ids may end the request.
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 = off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # on prompt and output tokens (HF / vLLM semantics)
    presence_penalty: float = 0.0  # on output tokens
    frequency_penalty: float = 0.0  # on output tokens
    seed: int | None = None
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    # Number of top logprobs per output token; 0 = only the sampled token's; None = none.
    logprobs: int | None = None
    skip_special_tokens: bool = True
    # Guided decoding, at most one: a JSON schema (dict or JSON text), any JSON object, a regular
    # expression the whole output must match, or one of a list of strings.
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    guided_spec: object = field(default=None, init=False, repr=False, compare=False)
    # Set by the chat layer for tool_choice auto (guided.spec.TriggeredSpec): free text until the output
    # opens a tool call, then the call held to the tools' schemas until it closes.
    triggered_spec: object = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        _int_at_least(self.n, "n", 1)
        _check(self.n <= MAX_N, "n", f"must be <= {MAX_N}, got {self.n}")
        _int_at_least(self.max_tokens, "max_tokens", 1)
        _int_at_least(self.min_tokens, "min_tokens", 0)
        _check(self.min_tokens <= self.max_tokens, "min_tokens",
               f"must be <= max_tokens ({self.max_tokens}), got {self.min_tokens}")
        _finite(self.temperature, "temperature")
        _check(self.temperature >= 0.0, "temperature", f"must be >= 0, got {self.temperature}")
        _finite(self.top_p, "top_p")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and (self.top_k == -1 or self.top_k >= 1), "top_k",
               f"must be -1 (off) or >= 1, got {self.top_k!r}")
        _finite(self.min_p, "min_p")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"must be in [0, 1], got {self.min_p}")
        _finite(self.repetition_penalty, "repetition_penalty")
        _check(self.repetition_penalty > 0.0, "repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            _finite(value, name)
            _check(-2.0 <= value <= 2.0, name, f"must be in [-2, 2], got {value}")
        _check(self.seed is None or isinstance(self.seed, int), "seed", f"must be an integer, got {self.seed!r}")
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop",
               f"at most {MAX_STOP_STRINGS} stop strings, got {len(self.stop)}")
        for s in self.stop:
            _check(isinstance(s, str) and 0 < len(s) <= MAX_STOP_STRING_CHARS, "stop",
                   f"each stop string must be a non-empty string of at most {MAX_STOP_STRING_CHARS} characters")
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"at most {MAX_STOP_TOKEN_IDS} ids, got {len(self.stop_token_ids)}")
        for t in self.stop_token_ids:
            _check(isinstance(t, int) and t >= 0, "stop_token_ids", f"ids must be integers >= 0, got {t!r}")
        _check(self.logprobs is None or (isinstance(self.logprobs, int) and self.logprobs >= 0), "logprobs",
               f"must be None or an integer >= 0, got {self.logprobs!r}")
        if self.json_schema is not None or self.json_object or self.regex is not None or self.choice is not None:
            from .guided.spec import build_spec
            self.guided_spec = build_spec(self.json_schema, self.json_object, self.regex, self.choice)

    @classmethod
    def from_response_format(cls, response_format: dict | None, **kwargs) -> "SamplingParams":
        """SamplingParams with OpenAI's response_format ({"type": "json_object"} or
        {"type": "json_schema", "json_schema": {"schema": ...}}) mapped onto the guided fields."""
        from .guided.spec import from_response_format
        return cls(**kwargs, **from_response_format(response_format))

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE

    @property
    def max_stop_len(self) -> int:
        return max((len(s) for s in self.stop), default=0)


def _check(ok: bool, field_name: str, message: str):
    if not ok:
        raise InvalidParameterError(field_name, message)


def _int_at_least(value, field_name: str, low: int):
    _check(isinstance(value, int) and not isinstance(value, bool) and value >= low, field_name,
           f"must be an integer >= {low}, got {value!r}")


def _finite(value, field_name: str):
    _check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value),
           field_name, f"must be a finite number, got {value!r}")
