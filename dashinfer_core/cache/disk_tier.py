"""The disk tier of the prefix cache (EngineConfig.disk_cache_dir): DiskTier decides (rank 0, with the
scheduler's block manager), DiskIO moves blocks between a rank's KV cache and its files.

Blocks go to disk when they are computed (write-behind, `disk_cache_write_behind`) and when they leave the
last memory tier that held them (the device, or the CPU tier when there is one). A new request whose
leading blocks miss the device and CPU tiers but are on disk waits parked, like a request waiting for its
guided pattern, while a reader thread reads them; then they are copied into free device blocks and join the
prefix cache, and the request is queued and hits them there.

Names on disk must mean the same thing after a restart, so they are not the in-memory keys (whose parent
uids are this process's counters) but chain digests: a block's digest hashes its parent's digest, the
request's cache salt and image digests, and its token ids. What else shapes K and V goes into the
fingerprint (kv_fingerprint). A LoRA adapter enters a request's chain by the digest of its weights (its id
and name are only the caller's names for it).

Under tensor parallel every rank keeps its own shard's files (its fingerprint holds its rank); rank 0 sends
the others each write, read and install as a DiskMessage between steps, and a read is copied in only when
every rank read its copy intact.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .block_manager import BlockManager, BlockOps
from .disk_store import BlockFile, DiskStore

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


@dataclass
class DiskLoad:
    request: object
    first: int  # index of the first block read (the blocks before it were in memory when it was parked)
    future: object  # rank 0's read (or, for a follower, the read it waits on)
    digests: tuple[str, ...] = ()  # what it reads; () for a request waiting on another's read of its blocks
    load_id: int = 0


@dataclass
class DiskMessage:
    """Rank 0 to every rank (tensor parallel): each rank writes and reads its own shard's files.
    kind: "write" (items: (pool "device" | "cpu", block or slot, digest, token ids)), "read" (items: (digests,
    token ids)), "install" (items: (index in the read, device block)) or "drop"."""
    kind: str
    load_id: int = 0
    items: list = field(default_factory=list)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def weights_identity(model_dir: Path, gguf_file: Path | None, cache_dir: str) -> str:
    """A digest of the model's config and weight files' contents. A file's digest is remembered (in
    cache_dir) under its path, size and modification time, so a restart does not read the weights twice."""
    files = [p for p in sorted(Path(model_dir).iterdir()) if p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES]
    if gguf_file is not None:
        files.append(Path(gguf_file))
    memo_dir = Path(cache_dir) / ".weights"
    parts = []
    for path in files:
        stat = path.stat()
        memo_key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:32]
        memo = memo_dir / memo_key
        try:
            digest = memo.read_text().strip()
        except OSError:
            digest = ""
        if len(digest) != 64:
            digest = _file_digest(path)
            try:
                memo_dir.mkdir(parents=True, exist_ok=True)
                temp = memo.with_name(f"{memo_key}.{os.getpid()}.tmp")
                temp.write_text(digest)
                os.replace(temp, memo)
            except OSError:
                pass  # unwritable: the tier turns itself off; the digest is still right
        parts.append(f"{path.name}:{digest}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def kv_fingerprint(config, runner, weights: str) -> str:
    """Everything that shapes a block's K and V besides its tokens, as one string."""
    return json.dumps({
        "format": FORMAT_VERSION, "weights": weights, "dtype": str(runner.dtype),
        "kv_cache_dtype": config.kv_cache_dtype, "quantization": config.quantization,
        "group_size": config.group_size, "block_size": config.block_size,
        "tp_rank": runner.tp.rank, "tp_size": runner.tp.size, "device": runner.device.type,
        "attention": type(runner.attention).__name__,
        # CPU routes (compiled layers, bf16 kernels...) round differently: their K/V are not interchangeable
        "fast_paths": {name: bool(choice.on) for name, choice in sorted(runner.fast_paths.items())},
    }, sort_keys=True)


class DiskIO:
    """One rank's side of the disk tier: its store (files named by its own fingerprint, which holds its
    rank), the copies between its KV cache and the files, and its reads in flight. Rank 0's engine drives
    it directly and, under tensor parallel, sends the other ranks the same calls as DiskMessages."""

    def __init__(self, config, runner):
        from ..loader.hf_loader import gguf_source
        self.kv = runner.kv_cache
        self.tp = runner.tp
        try:
            weights = weights_identity(runner.model_dir, gguf_source(config.model, config.quantization),
                                       config.disk_cache_dir)
        except OSError as exc:  # unreadable model files: no safe name for anything
            weights = f"unknown:{exc}"
        self.fingerprint = kv_fingerprint(config, runner, weights)
        name = hashlib.sha256(self.fingerprint.encode()).hexdigest()[:16]
        self.store = DiskStore(config.disk_cache_dir, config.disk_cache_bytes, self.fingerprint, name)
        # Each array of a block as the files hold it: [layers, 2, kv heads, block_size, width]
        self.expected = [(p.dtype, (p.shape[0], p.shape[1], *p.shape[3:])) for p in self.kv.pools]
        self.reads: dict[int, tuple] = {}  # load id -> (future of the BlockFiles read, their digests)

    def handle(self, message: DiskMessage):
        if message.kind == "write":
            return self.write(message.items)
        if message.kind == "read":
            return self.read(message.load_id, *message.items)
        if message.kind == "install":
            return self.install(message.load_id, message.items)
        self.reads.pop(message.load_id, None)

    def write(self, items: list[tuple]) -> None:
        """Copy the blocks off the cache now (they may be reused right after) and queue their files."""
        if not self.store.enabled:
            return
        for where, index, digest, tokens in items:
            pools = self.kv.pools if where == "device" else self.kv.cpu_pools
            arrays = [p[:, :, index].clone(memory_format=torch.contiguous_format).cpu() for p in pools]
            self.store.write_async(BlockFile(digest=digest, token_ids=tokens, arrays=arrays))

    def read(self, load_id: int, digests: list[str], tokens: list[tuple]):
        future = self.store.read_async(digests, tokens, self.expected)
        self.reads[load_id] = (future, digests)
        return future

    def install(self, load_id: int, placements: list[tuple[int, int]]) -> bool:
        """Copy blocks of read `load_id` into device blocks ((index in the read, block) pairs), if every rank
        read them intact (agreed with the other ranks); False: nothing was copied anywhere."""
        future, digests = self.reads.pop(load_id, (None, []))
        try:
            blocks = future.result() if future is not None else []
        except Exception:
            logger.exception("disk tier: reading blocks back failed")
            blocks = []
        ok = all(i < len(blocks) for i, _ in placements)
        if self.tp.min_int(int(ok)) == 0:
            # Another rank's copy is gone or bad: delete this rank's too, so that the blocks, computed again,
            # are written again by every rank (rank 0 only writes what it does not hold).
            for i, _ in placements:
                self.store.discard(digests[i])
            return False
        for i, device_block in placements:
            for pool, data in zip(self.kv.pools, blocks[i].arrays):
                pool[:, :, device_block].copy_(data)
        return True

    def shutdown(self) -> None:
        self.reads.clear()
        self.store.shutdown()


class DiskTier:
    """Rank 0's side: which requests wait for which blocks, names for them, what goes to disk and when."""

    def __init__(self, config, runner, block_manager: BlockManager):
        self.block_manager = block_manager
        self.runner = runner
        self.io: DiskIO = runner.disk_io
        self.kv = runner.kv_cache
        self.block_size = config.block_size
        self.write_behind = config.disk_cache_write_behind
        self.parked: dict[str, DiskLoad] = {}
        self.reading: dict[str, object] = {}  # digest -> the read bringing it in
        self.pending_writes: list[tuple] = []  # evicted blocks to copy out before the step reuses them
        self.on_ready = None  # AsyncEngine's wake-up, called from the reader thread
        self._load_ids = itertools.count(1)
        block_manager.record_new_blocks = True
        block_manager.cache.on_evict = self._evicted

    @property
    def store(self) -> DiskStore:
        return self.io.store

    @property
    def stats(self):
        return self.store.stats

    def _send(self, message: DiskMessage):
        """Every rank does it on its own shard (this one last: an install waits on the others' verdicts)."""
        if self.runner.ranks is not None:
            self.runner.ranks.send(message)
        return self.io.handle(message)

    # ---- names ---------------------------------------------------------------------------------
    @staticmethod
    def eligible(request) -> bool:
        return request.lora is None or request.lora_adapter is not None

    def digests(self, seq, count: int) -> list[str]:
        """Chain digests of seq's first `count` full blocks (kept on the sequence: tokens never change)."""
        done, bs, tokens = seq.disk_digests, self.block_size, seq.token_ids
        if len(done) < count:
            request = seq.request
            extra = json.dumps([request.cache_salt, list(request.mm.digests) if request.mm is not None else None,
                                request.lora_adapter.digest if request.lora is not None else None])
            for i in range(len(done), count):
                h = hashlib.blake2b(digest_size=20)
                h.update(bytes.fromhex(done[-1]) if done else b"root")
                h.update(extra.encode())
                h.update(array("q", tokens[i * bs:(i + 1) * bs]).tobytes())
                done.append(h.hexdigest())
        return done[:count]

    # ---- reading back --------------------------------------------------------------------------
    def park(self, request) -> bool:
        """True if the request's next blocks after its memory hits are on disk: a read starts and the
        request waits here until `poll` hands it back."""
        seq = request.sequences[0]
        if not self.store.enabled or not self.eligible(request) or \
                (request.pooling is not None and request.pooling.pooling == "mean"):
            return False
        full = (seq.num_tokens - 1) // self.block_size  # the last token is always computed
        first = len(self.block_manager.match_prefix(seq))
        if first >= full:
            return False
        digests = self.digests(seq, full)
        leader = self.reading.get(digests[first])
        if leader is not None:  # another request reads these blocks now: look again once they are in memory
            self._add(DiskLoad(request, first, leader))
            return True
        count = 0
        while first + count < full and self.store.contains(digests[first + count]):
            count += 1
        if count == 0:
            return False
        bs = self.block_size
        wanted = list(digests[first:first + count])
        tokens = [tuple(seq.token_ids[i * bs:(i + 1) * bs]) for i in range(first, first + count)]
        load_id = next(self._load_ids)
        future = self._send(DiskMessage("read", load_id, [wanted, tokens]))
        load = DiskLoad(request, first, future, tuple(wanted), load_id)
        self.reading.update(dict.fromkeys(load.digests, load.future))
        self._add(load)
        return True

    def _add(self, load: DiskLoad) -> None:
        if self.on_ready is not None:
            load.future.add_done_callback(lambda _: self.on_ready())
        self.parked[load.request.request_id] = load

    def poll(self) -> list:
        """Requests whose read ended: their blocks are in the prefix cache now (as far as they still
        chain onto what is cached and free blocks allow). They go to the scheduler's queue."""
        ready = []
        for request_id, load in list(self.parked.items()):  # in the order parked: readers before followers
            if not load.future.done():
                continue
            del self.parked[request_id]
            if not load.digests:
                if not self.park(load.request):  # parked again if more of its blocks are on disk
                    ready.append(load.request)
                continue
            for digest in load.digests:
                self.reading.pop(digest, None)
            if not self._install(load):
                self.parked[request_id] = load  # every block is in use: try again after the next step
                for digest in load.digests:
                    self.reading[digest] = load.future
                continue
            ready.append(load.request)
        return ready

    def _install(self, load: DiskLoad) -> bool:
        """Place the blocks read into device blocks; False when no block is free now (the request could not
        be admitted either: running sequences hold every block). The read is finished with otherwise."""
        seq = load.request.sequences[0]
        try:
            blocks = load.future.result()
        except Exception:
            blocks = []
        hits = self.block_manager.match_prefix(seq)
        skip = len(hits) - load.first  # blocks computed meanwhile (< 0: ones before the read left memory)
        if blocks and skip >= 0 and len(blocks) > skip and not self.block_manager.num_free_blocks:
            return False
        placed = []
        if blocks and 0 <= skip < len(blocks):
            ops = BlockOps()
            placed = self.block_manager.install_cached(hits[-1].uid if hits else None,
                                                       [b.token_ids for b in blocks[skip:]],
                                                       seq.request.prefix_key, ops)
            self.flush_writes()  # blocks evicted for these places go out before they are overwritten
            self.kv.apply(ops)  # evictions to the CPU tier and zeroing first: then the blocks' contents
        if not placed:
            self._send(DiskMessage("drop", load.load_id))
            return True
        if not self._send(DiskMessage("install", load.load_id,
                                      [(skip + j, block) for j, (_, block) in enumerate(placed)])):
            self.block_manager.uninstall(placed)  # some rank's file was bad: nobody keeps them
            return True
        for (entry, _), block in zip(placed, blocks[skip:]):
            entry.digest = block.digest
        if seq.num_preemptions == 0:
            seq.num_disk_cached_tokens = len(placed) * self.block_size
            self.stats.hit_tokens += seq.num_disk_cached_tokens
        return True

    def remove(self, request) -> None:
        """An aborted request stops waiting (its read finishes and is thrown away)."""
        load = self.parked.pop(request.request_id, None)
        if load is not None and load.digests:
            for digest in load.digests:
                self.reading.pop(digest, None)
            self._send(DiskMessage("drop", load.load_id))

    def futures(self) -> list:
        return [load.future for load in self.parked.values()]

    def has_news(self) -> bool:
        return any(load.future.done() for load in self.parked.values())

    # ---- writing out ---------------------------------------------------------------------------
    def after_step(self) -> None:
        """Digest the blocks registered this step; write them behind when that option is on."""
        new, self.block_manager.new_blocks = self.block_manager.new_blocks, []
        if not self.store.enabled:
            return
        for seq, index, entry in new:
            if not self.eligible(seq.request) or entry.device_block is None:
                continue
            entry.digest = self.digests(seq, index + 1)[index]
            if self.write_behind and not self.store.contains(entry.digest):
                self.pending_writes.append(("device", entry.device_block, entry.digest, entry.key[1]))
        self.flush_writes()

    def _evicted(self, entry, where: str, index: int) -> None:
        # Called while the evicted copy is intact; copied out by flush_writes before the step reuses it.
        if entry.digest is not None and self.store.enabled and not self.store.contains(entry.digest):
            self.pending_writes.append((where, index, entry.digest, entry.key[1]))

    def flush_writes(self) -> None:
        """Copy out the blocks waiting to be written (every rank its shard). Called before any cache
        operation or forward that could overwrite them."""
        if self.pending_writes:
            writes, self.pending_writes = self.pending_writes, []
            self._send(DiskMessage("write", 0, writes))

    def shutdown(self) -> None:
        self.flush_writes()
        self.parked.clear()
