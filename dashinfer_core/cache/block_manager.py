"""Block allocator for the paged KV cache.

Blocks are reference-counted: the completions of an n > 1 request share their prompt's blocks.
A shared block is copied before anyone writes into it (copy-on-write); the copies are returned to
the caller, which performs them on the cache tensors before the step's forward.
"""
from __future__ import annotations

from collections import deque

from ..engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))
        # Blocks handed out for the first time since the last drain: the runner zeroes them, so the
        # cache memory is only touched (and resident) once used, yet never holds garbage that a
        # masked-out padding slot could turn into NaN.
        self.num_blocks_used_ever = 0
        self.fresh_blocks: list[int] = []

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks `seq` needs so that its first `num_tokens` tokens have slots."""
        needed = max(0, -(-num_tokens // self.block_size) - len(seq.block_table))
        if self._write_block_is_shared(seq, num_tokens):
            needed += 1
        return needed

    def allocate(self, seq: Sequence, num_tokens: int, copies: list[tuple[int, int]]) -> bool:
        """Give `seq` slots for its first `num_tokens` tokens; False (and no change) if there is not
        enough room. Copy-on-write pairs (src, dst) are appended to `copies`."""
        if self.blocks_needed(seq, num_tokens) > len(self.free_blocks):
            return False
        if self._write_block_is_shared(seq, num_tokens):
            index = seq.num_computed_tokens // self.block_size
            shared = seq.block_table[index]
            private = self._take()
            copies.append((shared, private))
            self._release(shared)
            seq.block_table[index] = private
        while len(seq.block_table) * self.block_size < num_tokens:
            seq.block_table.append(self._take())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent."""
        for block in parent.block_table:
            self.ref_counts[block] += 1
        child.block_table = list(parent.block_table)

    def free(self, seq: Sequence) -> None:
        for block in reversed(seq.block_table):
            self._release(block)
        seq.block_table = []

    # ---- internals -----------------------------------------------------------------------------
    def _write_block_is_shared(self, seq: Sequence, num_tokens: int) -> bool:
        # Only the block holding the first uncomputed position can be shared and written: blocks
        # before it are full and read-only, blocks after it are new.
        if num_tokens <= seq.num_computed_tokens:
            return False
        index = seq.num_computed_tokens // self.block_size
        return index < len(seq.block_table) and self.ref_counts[seq.block_table[index]] > 1

    def take_fresh_blocks(self) -> list[int]:
        fresh, self.fresh_blocks = self.fresh_blocks, []
        return fresh

    def _take(self) -> int:
        block = self.free_blocks.popleft()
        assert self.ref_counts[block] == 0
        self.ref_counts[block] = 1
        if block >= self.num_blocks_used_ever:  # free_blocks starts in order, so ids below are used
            self.num_blocks_used_ever = block + 1
            self.fresh_blocks.append(block)
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0, f"block {block} released twice"
        if self.ref_counts[block] == 0:
            self.free_blocks.append(block)
