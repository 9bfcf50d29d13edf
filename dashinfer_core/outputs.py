"""What the engine hands back: one RequestOutput per request per step it changed (streaming), or
once at the end (LLM.generate). Field names follow vLLM so its users need no new habits."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str  # text so far (all of it once finished); partial stop-string matches held back
    token_ids: list[int]
    delta_text: str = ""  # new since the previous output of this request
    delta_token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    logprobs: list[dict[int, float]] | None = None  # per output token: {token id: logprob}
    cumulative_logprob: float | None = None
    # LLM.chat only: the calls parsed from the output when tools were given (tools.ToolCall; the text
    # stays as generated), and a reasoning model's thinking (the text before </think>).
    tool_calls: list | None = None
    reasoning_content: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache (device + CPU tier)
    num_cpu_cached_tokens: int = 0  # of which from the CPU tier
    num_disk_cached_tokens: int = 0  # of which read back from the disk tier for this request
    error: str | None = None
    # True when the error is the request's own (e.g. a guided pattern too complex to compile in time),
    # so servers answer 4xx; False for engine failures (5xx).
    error_is_client: bool = False
    arrival_time: float | None = None
    embedding: list[float] | None = None  # an embedding request's pooled vector, once finished
    first_token_time: float | None = None
    finished_time: float | None = None
    # Speculative decoding: drafts proposed for this request and how many of them were accepted
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    # Shortcuts to the first completion (the only one when n == 1).
    @property
    def text(self) -> str:
        return self.outputs[0].text if self.outputs else ""

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids if self.outputs else []

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason if self.outputs else None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(o.token_ids) for o in self.outputs)
