"""Block allocator for the paged KV cache, with the prefix cache.

Blocks are reference-counted: the completions of an n > 1 request, and requests with a common
prefix, share blocks. A shared block is copied before anyone writes into it (copy-on-write).

Prefix caching: every full, computed block is registered under its content key (see prefix_cache).
A new sequence reuses each leading block whose key is cached and computes only the rest; the last
token is always computed, so no shared block is ever written. A block that no sequence uses but
that holds a cached entry stays "evictable": it is reused least-recently-used first, after the
truly free blocks, and its contents move to the CPU tier (when there is one) instead of being lost.

The copies this implies (copy-on-write, swap out to the CPU tier, swap in from it, zeroing of blocks
used for the first time) are collected in BlockOps for the runner to perform before the forward.
"""
from __future__ import annotations

import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

from ..engine.sequence import Sequence
from .prefix_cache import CacheEntry, PrefixCache


@dataclass
class BlockOps:
    """Cache copies a step needs, in the order the runner performs them."""
    swap_out: list[tuple[int, int]] = field(default_factory=list)  # (device block, cpu slot)
    fresh: list[int] = field(default_factory=list)  # blocks used for the first time: zero them
    swap_in: list[tuple[int, int]] = field(default_factory=list)  # (cpu slot, device block)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (src block, dst block): copy-on-write
    pinned_cpu_slots: set[int] = field(default_factory=set)  # read by swap_in: not to be overwritten


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False,
                 num_cpu_blocks: int = 0, ttl: float | None = 300.0, clock=time.monotonic):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))  # unused and holding nothing cached
        self.evictable: OrderedDict[int, None] = OrderedDict()  # unused but cached, oldest first
        self.cache = PrefixCache(num_cpu_slots=num_cpu_blocks if enable_prefix_caching else 0, ttl=ttl,
                                 clock=clock)
        # The disk tier (when there is one) reads the blocks registered since it last looked:
        # (sequence, block index, entry).
        self.record_new_blocks = False
        self.new_blocks: list = []
        # Blocks are handed out in id order at first, so ids below this one have been used before.
        self.num_blocks_used_ever = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def stats(self):
        return self.cache.stats

    # ---- prefix matching and admission ---------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> list[CacheEntry]:
        """Cached entries for the leading full blocks of seq's tokens (never all of its tokens)."""
        if not self.enable_prefix_caching:
            return []
        bs, tokens, extra = self.block_size, seq.token_ids, seq.request.prefix_key
        entries, parent = [], None
        for i in range((len(tokens) - 1) // bs):
            entry = self.cache.entries.get(self.cache.make_key(parent, tokens[i * bs:(i + 1) * bs], extra))
            if entry is None:
                break
            in_use = entry.device_block is not None and self.ref_counts[entry.device_block] > 0
            if self.cache.is_expired(entry) and not in_use:
                self._expire(entry)
                break
            entries.append(entry)
            parent = entry.uid
        return entries

    def admit(self, seq: Sequence, hits: list[CacheEntry], num_tokens: int, ops: BlockOps) -> bool:
        """Give a sequence without blocks its cached prefix `hits` plus slots up to `num_tokens`;
        False (and no change) if there is not enough room. The caller (the scheduler) then counts
        the hits' tokens as computed."""
        assert not seq.block_table
        on_device = [e for e in hits if e.device_block is not None]
        needed = -(-num_tokens // self.block_size) - len(on_device)
        unavailable = sum(1 for e in on_device if e.device_block in self.evictable)
        if needed > self.num_free_blocks - unavailable:
            return False
        for entry in hits:  # pin first: taking blocks below may evict to the CPU tier
            if entry.device_block is None:
                ops.pinned_cpu_slots.add(entry.cpu_slot)
        for entry in on_device:
            self._ref(entry.device_block)
        for entry in hits:
            if entry.device_block is None:
                block = self._take(ops)
                ops.swap_in.append((entry.cpu_slot, block))
                self.cache.back_on_device(entry, block)
            seq.block_table.append(entry.device_block)
            seq.block_uids.append(entry.uid)
            self.cache.touch(entry)
        cached = len(hits) * self.block_size
        if seq.num_preemptions == 0:  # count the prompt's hits once, not on recompute
            seq.num_cached_tokens = cached
            seq.num_cpu_cached_tokens = (len(hits) - len(on_device)) * self.block_size
            self.stats.queried_tokens += seq.num_prompt_tokens
            self.stats.device_hit_tokens += len(on_device) * self.block_size
            self.stats.cpu_hit_tokens += seq.num_cpu_cached_tokens
        # The cached blocks are full and never written (the last token is always computed), so the
        # rest are new blocks.
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take(ops))
        return True

    def register_computed(self, seq: Sequence) -> None:
        """Register seq's full, computed blocks that are not cached yet."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        for i in range(len(seq.block_uids), seq.num_computed_tokens // bs):
            parent = seq.block_uids[i - 1] if i else None
            key = self.cache.make_key(parent, seq.token_ids[i * bs:(i + 1) * bs], seq.request.prefix_key)
            entry = self.cache.entries.get(key)
            block = seq.block_table[i]
            if entry is None:
                entry = self.cache.register(key, block)
                if self.record_new_blocks:
                    self.new_blocks.append((seq, i, entry))
            elif entry.device_block is None:  # cached only on the CPU: this block is its device copy now
                entry.device_block = block
                self.cache.by_block[block] = entry
            # else: another sequence registered the same contents; this block stays private
            seq.block_uids.append(entry.uid)

    # ---- allocation ----------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int, ops: BlockOps) -> bool:
        """Give `seq` slots for its first `num_tokens` tokens; False (and no change) if there is not
        enough room."""
        table = seq.block_table
        if seq.num_computed_tokens < num_tokens <= len(table) * self.block_size and \
                self.ref_counts[table[seq.num_computed_tokens // self.block_size]] == 1:
            return True  # a decode into a slot of its own last block (most calls): nothing to do
        shared_write = self._write_block_is_shared(seq, num_tokens)
        needed = max(0, -(-num_tokens // self.block_size) - len(seq.block_table)) + int(shared_write)
        if needed > self.num_free_blocks:
            return False
        if shared_write:
            index = seq.num_computed_tokens // self.block_size
            shared = seq.block_table[index]
            private = self._take(ops)
            ops.copies.append((shared, private))
            self._release(shared)
            seq.block_table[index] = private
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take(ops))
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past those holding seq's first `num_tokens` tokens (slots taken for drafts
        that were rejected). They are never cached: only full, computed blocks are."""
        keep = -(-num_tokens // self.block_size)
        while len(seq.block_table) > keep:
            self._release(seq.block_table.pop())

    def install_cached(self, parent_uid: int | None, blocks_tokens: list[tuple], extra_key,
                       ops: BlockOps) -> list[tuple[CacheEntry, int]]:
        """Blocks read back from the disk tier join the prefix cache as device blocks no one uses yet: the
        chain of `blocks_tokens` after the entry `parent_uid` (None: from the start), as far as free or
        evictable blocks allow. The caller fills the blocks after performing `ops`. Returns the (entry,
        device block) pairs placed, in order."""
        placed = []
        for tokens in blocks_tokens:
            key = self.cache.make_key(parent_uid, tokens, extra_key)
            if key in self.cache.entries or not self.num_free_blocks:
                break
            block = self._take(ops)  # held until all are placed: none of them is evicted for another
            entry = self.cache.register(key, block)
            placed.append((entry, block))
            parent_uid = entry.uid
        for _, block in placed:
            self._release(block)
        return placed

    def uninstall(self, placed: list[tuple[CacheEntry, int]]) -> None:
        """Undo install_cached (the blocks could not be filled): forget the entries, free the blocks."""
        for entry, block in placed:
            if self.ref_counts[block] == 0 and block in self.evictable:
                del self.evictable[block]
                self.cache.drop(entry)
                self.free_blocks.append(block)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent."""
        for block in parent.block_table:
            self._ref(block)
        child.block_table = list(parent.block_table)
        child.block_uids = list(parent.block_uids)

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []
        seq.block_uids = []

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix no running sequence uses (both tiers); returns how many."""
        dropped = 0
        for entry in list(self.cache.entries.values()):
            if entry.device_block is not None and self.ref_counts[entry.device_block] > 0:
                continue
            if entry.device_block is not None:
                del self.evictable[entry.device_block]
                self.free_blocks.append(entry.device_block)
            self.cache.drop(entry)
            dropped += 1
        return dropped

    # ---- internals -----------------------------------------------------------------------------
    def _write_block_is_shared(self, seq: Sequence, num_tokens: int) -> bool:
        # Only the block holding the first uncomputed position can be shared and written: blocks
        # before it are full and read-only, blocks after it are new.
        if num_tokens <= seq.num_computed_tokens:
            return False
        index = seq.num_computed_tokens // self.block_size
        return index < len(seq.block_table) and self.ref_counts[seq.block_table[index]] > 1

    def _take(self, ops: BlockOps) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            slot = self.cache.leave_device(block, ops.pinned_cpu_slots)
            if slot is not None:
                ops.swap_out.append((block, slot))
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        if block >= self.num_blocks_used_ever:
            self.num_blocks_used_ever = block + 1
            ops.fresh.append(block)
        return block

    def _ref(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            entry = self.cache.by_block.get(block)
            if entry is not None:
                self.evictable[block] = None
                entry.last_used = self.cache.clock()
            else:
                self.free_blocks.append(block)

    def _expire(self, entry: CacheEntry) -> None:
        if entry.device_block is not None and entry.device_block in self.evictable:
            del self.evictable[entry.device_block]
            self.free_blocks.append(entry.device_block)
        self.cache.stats.expired += 1
        self.cache.drop(entry)
