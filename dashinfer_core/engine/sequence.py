"""Request and sequence state.

A Request is what a caller submitted; it owns `n` Sequences (one per completion). A Sequence holds
its tokens (prompt + output), how many of them have K/V in the cache (`num_computed_tokens`), and
its block table. Prefill, chunked prefill, decode and recompute after preemption are all the same
thing: compute tokens [num_computed_tokens, len(token_ids)) and sample once all are computed.
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from ..sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


_seq_counter = itertools.count()


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int  # the request's seed, or one drawn for it when params.seed is None
    priority: int = 0  # lower runs first (vLLM's convention)
    # Extra prefix-cache key: requests with different salts never share cached blocks.
    cache_salt: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    arrival_order: int = field(default_factory=lambda: next(_seq_counter))
    # Completion 0 at first; completions 1..n-1 are forked from it once the prompt is computed (they
    # share its blocks, so the prompt is prefilled once). A request that ends early gets its
    # missing completions as ended ones, so `needs_fork` is False from then on.
    sequences: list["Sequence"] = field(default_factory=list)
    error: str | None = None
    error_is_client: bool = False
    first_token_time: float | None = None
    # Guided decoding: the compiled index (a future until ready) and when waiting for it gives up.
    guided_future: object = None
    guided_deadline: float = 0.0
    # LoRA: the adapter asked for (None: the base model), its host weights once loaded, and the uid
    # of the registration it runs with (prefix-cache blocks are keyed by it).
    lora: object = None
    lora_adapter: object = None
    lora_uid: int | None = None
    # Vision-language models: the request's images and M-RoPE positions (multimodal.MultiModalData).
    mm: object = None
    # An embedding request (pooling.PoolingParams): pooled instead of sampled; its vector once done.
    pooling: object = None
    embedding: list[float] | None = None
    trigger_future: object = None  # the compile of params.triggered_spec's pattern

    @property
    def prefix_key(self):
        """What besides the tokens a cached block must match: the cache salt, the adapter and the images
        (their tokens are all the same placeholder id, so the images' digests tell them apart)."""
        if self.lora_uid is None and self.mm is None:
            return self.cache_salt
        return (self.cache_salt, self.lora_uid, self.mm.digests if self.mm is not None else None)

    @property
    def needs_fork(self) -> bool:
        return len(self.sequences) < self.params.n

    @property
    def finished(self) -> bool:
        return len(self.sequences) == self.params.n and all(s.is_finished for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int  # which of the request's n completions
    token_ids: list[int]
    num_prompt_tokens: int
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    lora_slot: int = -1  # the device slot of its adapter while running (-1: none)
    block_table: list[int] = field(default_factory=list)
    # Prefix-cache entry uids of the leading full blocks (registered or reused), parallel to block_table.
    block_uids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    # Prompt tokens whose K/V came from the prefix cache at admission (device tier, CPU tier).
    num_cached_tokens: int = 0
    num_cpu_cached_tokens: int = 0
    num_disk_cached_tokens: int = 0  # of those, read back from the disk tier for this request
    # Disk tier: chain digests of the leading full blocks, computed as needed (a function of the tokens).
    disk_digests: list[str] = field(default_factory=list)
    num_preemptions: int = 0
    # Output text state (see output_processor): text decoded so far, and how much was sent out.
    text: str = ""
    num_text_sent: int = 0
    num_tokens_sent: int = 0
    detok_prefix_offset: int = 0
    detok_read_offset: int = 0
    detok_stream: object = None  # the tokenizer's DecodeStream; False where the Python window decodes
    logprobs: list[dict[int, float]] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    guided: object = None  # GuidedState for guided requests
    guided_triggered: bool = False  # `guided` holds a triggered pattern (tool call in auto mode)
    pool_sum: object = None  # mean pooling: the sum of the hidden states computed so far
    # Speculative decoding: the drafts this step verifies after the last token (computed with it, never in
    # token_ids), and how many were proposed and accepted over the sequence's life.
    spec_tokens: list[int] = field(default_factory=list)
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def priority_key(self) -> tuple[int, int, int]:
        return (self.request.priority, self.request.arrival_order, self.index)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    @property
    def seed(self) -> int:
        # Each completion of an n > 1 request samples from its own stream.
        return (self.request.seed + 1_000_003 * self.index) & 0x7FFFFFFFFFFF
