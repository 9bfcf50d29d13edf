"""Prefix-cache bookkeeping: which full KV blocks hold which tokens, on the device and in the CPU tier.

A cached block is identified by the chain of its contents: key = (uid of the parent block's entry,
this block's token ids, extra key such as a cache salt or adapter id). Keys are compared by
equality in the dict, not by a hash alone, so a hash collision can never return the wrong block:
two keys are the same only if the token ids, the extra key and (inductively, through the parent's
uid) every earlier block are the same.

An entry lives on the device (`device_block`), in the CPU tier (`cpu_slot`), or both (a block
swapped back in keeps its CPU copy until the CPU LRU needs the slot). Entries not used for `ttl`
seconds no longer hit.
"""
from __future__ import annotations

import itertools
import time
from collections import OrderedDict
from dataclasses import dataclass, field


@dataclass(eq=False)
class CacheEntry:
    key: tuple
    uid: int
    device_block: int | None = None
    cpu_slot: int | None = None
    last_used: float = 0.0
    digest: str | None = None  # its chain digest, when a disk tier keeps blocks (disk_tier.py)


@dataclass
class PrefixCacheStats:
    queried_tokens: int = 0
    device_hit_tokens: int = 0
    cpu_hit_tokens: int = 0
    device_evictions: int = 0
    cpu_evictions: int = 0
    swaps_out: int = 0
    swaps_in: int = 0
    expired: int = 0

    @property
    def hit_rate(self) -> float:
        hits = self.device_hit_tokens + self.cpu_hit_tokens
        return hits / self.queried_tokens if self.queried_tokens else 0.0


@dataclass
class PrefixCache:
    num_cpu_slots: int = 0
    ttl: float | None = 300.0
    clock: callable = time.monotonic
    entries: dict = field(default_factory=dict)  # key -> CacheEntry
    by_block: dict = field(default_factory=dict)  # device block -> CacheEntry
    cpu_lru: OrderedDict = field(default_factory=OrderedDict)  # cpu slot -> CacheEntry, oldest first
    stats: PrefixCacheStats = field(default_factory=PrefixCacheStats)
    # Called with (entry, "device", block) or (entry, "cpu", slot) when an entry is evicted from the last
    # tier that held it, while that copy is still intact (the disk tier writes it out).
    on_evict: object = None

    def __post_init__(self):
        self._uids = itertools.count(1)
        self.free_cpu_slots = list(range(self.num_cpu_slots - 1, -1, -1))

    @staticmethod
    def make_key(parent_uid: int | None, token_ids, extra_key) -> tuple:
        return (parent_uid, tuple(token_ids), extra_key)

    def is_expired(self, entry: CacheEntry) -> bool:
        return self.ttl is not None and self.clock() - entry.last_used > self.ttl

    def touch(self, entry: CacheEntry) -> None:
        entry.last_used = self.clock()
        if entry.cpu_slot is not None:
            self.cpu_lru.move_to_end(entry.cpu_slot)

    def register(self, key: tuple, device_block: int) -> CacheEntry | None:
        """Record that device_block holds key; returns the new entry, or None if key is cached already."""
        if key in self.entries:
            return None
        entry = CacheEntry(key=key, uid=next(self._uids), device_block=device_block, last_used=self.clock())
        self.entries[key] = entry
        self.by_block[device_block] = entry
        return entry

    def drop(self, entry: CacheEntry) -> None:
        """Forget an entry entirely (both tiers)."""
        self.entries.pop(entry.key, None)
        if entry.device_block is not None:
            self.by_block.pop(entry.device_block, None)
            entry.device_block = None
        if entry.cpu_slot is not None:
            self.cpu_lru.pop(entry.cpu_slot, None)
            self.free_cpu_slots.append(entry.cpu_slot)
            entry.cpu_slot = None

    def leave_device(self, block: int, pinned_slots: set[int]) -> int | None:
        """Device block `block` is being reused: keep its entry in the CPU tier if there is one.
        Returns the CPU slot to copy the block into, or None when no copy is needed."""
        entry = self.by_block.pop(block)
        entry.device_block = None
        self.stats.device_evictions += 1
        if entry.cpu_slot is not None:  # already has a CPU copy (it was swapped in before)
            return None
        if self.num_cpu_slots == 0 or self.is_expired(entry):
            self._evicted(entry, "device", block)
            self.drop(entry)
            return None
        slot = self._take_cpu_slot(pinned_slots)
        if slot is None:
            self._evicted(entry, "device", block)
            self.drop(entry)
            return None
        entry.cpu_slot = slot
        self.cpu_lru[slot] = entry
        self.stats.swaps_out += 1
        return slot

    def back_on_device(self, entry: CacheEntry, block: int) -> None:
        entry.device_block = block
        self.by_block[block] = entry
        self.stats.swaps_in += 1

    def _take_cpu_slot(self, pinned_slots: set[int]) -> int | None:
        if self.free_cpu_slots:
            return self.free_cpu_slots.pop()
        for slot, victim in self.cpu_lru.items():  # oldest first; skip slots read this step
            if slot in pinned_slots:
                continue
            self.cpu_lru.pop(slot)
            victim.cpu_slot = None
            if victim.device_block is None:
                self._evicted(victim, "cpu", slot)
                self.entries.pop(victim.key, None)
            self.stats.cpu_evictions += 1
            return slot
        return None

    def _evicted(self, entry: CacheEntry, where: str, index: int) -> None:
        if self.on_evict is not None and not self.is_expired(entry):
            self.on_evict(entry, where, index)
