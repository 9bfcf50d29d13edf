"""Continuous-batching scheduler with chunked prefill and preemption by recompute. It is the only
caller of the block manager and the only writer of `Sequence.num_computed_tokens`.

Each step it fills a token budget (`max_num_batched_tokens`) and a sequence cap (`max_num_seqs`):
first the running sequences that decode (one token each), then running sequences part-way through
their prompt (chunked prefill), then waiting sequences in (priority, arrival) order. When a running
sequence needs a block and none is free, the lowest-priority, newest running sequence not yet in
this step is preempted: its blocks are freed and it goes back to waiting, to be recomputed later
from its tokens (prompt + what it already generated), which reproduces the same continuation.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from ..cache.block_manager import BlockManager, BlockOps
from .sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]  # decodes first (one token each), then prefill chunks
    num_new_tokens: list[int]
    num_decodes: int
    ops: BlockOps = field(default_factory=BlockOps)  # cache copies to do before the forward
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 enable_chunked_prefill: bool = True, lora=None):
        """lora: the engine's LoRAManager (device slots), or None without LoRA."""
        self.block_manager = block_manager
        self.lora = lora
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []  # sorted by priority_key
        self.running: list[Sequence] = []  # sorted by priority_key
        self.num_preemptions = 0

    # ---- queue management ----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=lambda s: s.priority_key)

    def add_running(self, seq: Sequence) -> None:
        """A forked completion joins the running set directly (its prompt is computed)."""
        seq.status = SequenceStatus.RUNNING
        if seq.request.lora is not None:
            self.lora.acquire(seq)
        bisect.insort(self.running, seq, key=lambda s: s.priority_key)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self._release_lora(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def fork(self, parent: Sequence, child: Sequence, num_new: int) -> None:
        """`child` (a new completion of parent's request) shares every block of `parent`, including
        the `num_new` tokens parent computes in the step being run, and joins the running set."""
        self.block_manager.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens + num_new
        self.add_running(child)

    def add_drafts(self, batch: ScheduledBatch, drafts: dict[int, list[int]]) -> None:
        """Speculative decoding: batch entries that decode one token also compute the drafts proposed for
        them (`drafts`: {batch index: tokens}), as far as the step's token budget and free blocks allow (a
        draft never preempts anyone). Sets each such sequence's spec_tokens."""
        budget = self.max_num_batched_tokens - batch.num_tokens
        for i, tokens in drafts.items():
            seq = batch.seqs[i]
            tokens = tokens[:budget]
            if not tokens or not self.block_manager.allocate(seq, seq.num_computed_tokens + 1 + len(tokens),
                                                             batch.ops):
                continue
            seq.spec_tokens = tokens
            batch.num_new_tokens[i] = 1 + len(tokens)
            budget -= len(tokens)
        self._order_decodes_first(batch)

    def finish_step(self, batch: ScheduledBatch, cache_prefixes: bool = True,
                    num_verified: dict[int, int] | None = None) -> None:
        """The batch's forward ran: its new tokens have K/V in the cache now; full blocks join the
        prefix cache (unless cache_prefixes is False: scoring). num_verified: {batch index: tokens} for
        entries that verified drafts: only the last token and the accepted drafts count as computed, and the
        blocks taken for rejected drafts go back."""
        for i, (seq, num_new) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            verified = num_verified.get(i) if num_verified else None
            seq.num_computed_tokens += num_new if verified is None else verified
            if cache_prefixes:
                self.block_manager.register_computed(seq)
            if verified is not None:
                self.block_manager.trim(seq, seq.num_tokens)

    def schedule_one(self, seq: Sequence, num_new: int) -> ScheduledBatch | None:
        """A batch of one sequence outside the queues (LLMEngine.score): slots for its next
        `num_new` tokens, or None when the cache cannot hold them."""
        batch = ScheduledBatch(seqs=[seq], num_new_tokens=[num_new], num_decodes=int(num_new == 1))
        if not self.block_manager.allocate(seq, seq.num_computed_tokens + num_new, batch.ops):
            return None
        return batch

    def reset_prefix_cache(self) -> int:
        return self.block_manager.reset_prefix_cache()

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step ------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        batch = ScheduledBatch(seqs=[], num_new_tokens=[], num_decodes=0)
        scheduled: set[int] = set()

        decodes, prefills = [], []
        for seq in self.running:
            uncomputed = len(seq.token_ids) - seq.num_computed_tokens
            if uncomputed == 1:
                decodes.append(seq)
            elif uncomputed > 1:
                prefills.append(seq)
        for seq in decodes + prefills:
            if budget == 0 or len(batch.seqs) >= self.max_num_seqs:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this step
            num_new = self._chunk(seq, budget)
            if num_new == 0:
                continue
            if not self._allocate_or_preempt(seq, num_new, batch, scheduled):
                continue  # seq itself was preempted
            self._append(batch, seq, num_new, scheduled)
            budget -= num_new

        # Admit waiting sequences, unless this step had to preempt (no room to spare). A sequence
        # starts from its longest cached prefix and computes the rest.
        position = 0  # waiting sequences before it were passed over (their adapter has no slot yet)
        while position < len(self.waiting) and not batch.preempted and budget > 0 and \
                len(batch.seqs) < self.max_num_seqs:
            seq = self.waiting[position]
            if seq.request.lora is not None and not self.lora.can_acquire(seq.request):
                position += 1
                continue
            if seq.block_table:  # part-way through (cannot happen today: preemption frees everything)
                num_new = self._chunk(seq, budget)
                ok = num_new > 0 and self.block_manager.allocate(seq, seq.num_computed_tokens + num_new, batch.ops)
            else:
                mean_pool = seq.request.pooling is not None and seq.request.pooling.pooling == "mean"
                hits = [] if mean_pool else self.block_manager.match_prefix(seq)  # it needs every token's state
                num_cached = len(hits) * self.block_manager.block_size
                num_new = self._chunk(seq, budget, already_computed=num_cached)
                ok = num_new > 0 and self.block_manager.admit(seq, hits, num_cached + num_new, batch.ops)
                if ok:
                    seq.num_computed_tokens = num_cached
            if not ok:
                break
            self.waiting.pop(position)
            self.add_running(seq)
            self._append(batch, seq, num_new, scheduled)
            budget -= num_new
        self._order_decodes_first(batch)
        return batch

    # ---- helpers -------------------------------------------------------------------------------
    def _chunk(self, seq: Sequence, budget: int, already_computed: int | None = None) -> int:
        computed = seq.num_computed_tokens if already_computed is None else already_computed
        remaining = seq.num_tokens - computed
        if remaining <= budget:
            return remaining
        return budget if self.enable_chunked_prefill else 0

    def _allocate_or_preempt(self, seq: Sequence, num_new: int, batch: ScheduledBatch,
                             scheduled: set[int]) -> bool:
        target = seq.num_computed_tokens + num_new
        while not self.block_manager.allocate(seq, target, batch.ops):
            victim = self._pick_victim(seq, scheduled)
            self._preempt(victim, batch)
            if victim is seq:
                return False
        return True

    def _pick_victim(self, seq: Sequence, scheduled: set[int]) -> Sequence:
        # running is sorted by priority_key: the last entry not yet scheduled is the least
        # important and newest; if every other one is in the batch already, preempt seq itself.
        for candidate in reversed(self.running):
            if candidate is not seq and candidate.seq_id not in scheduled:
                return candidate
        return seq

    def _release_lora(self, seq: Sequence) -> None:
        if self.lora is not None:
            self.lora.release(seq)

    def _preempt(self, seq: Sequence, batch: ScheduledBatch) -> None:
        self.running.remove(seq)
        self._release_lora(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        batch.preempted.append(seq)
        self.add(seq)

    @staticmethod
    def _append(batch: ScheduledBatch, seq: Sequence, num_new: int, scheduled: set[int]) -> None:
        batch.seqs.append(seq)
        batch.num_new_tokens.append(num_new)
        scheduled.add(seq.seq_id)

    @staticmethod
    def _order_decodes_first(batch: ScheduledBatch) -> None:
        counts = batch.num_new_tokens
        num_decodes = counts.count(1)
        if counts[:num_decodes].count(1) == num_decodes:  # already in order (most steps)
            batch.num_decodes = num_decodes
            return
        pairs = sorted(zip(batch.seqs, batch.num_new_tokens), key=lambda p: p[1] != 1)
        batch.seqs = [p[0] for p in pairs]
        batch.num_new_tokens = [p[1] for p in pairs]
        batch.num_decodes = sum(1 for p in pairs if p[1] == 1)
