"""The disk tier of the prefix cache, as the engine sees it (EngineConfig.disk_cache_dir).

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
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from array import array
from dataclasses import dataclass
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
    future: object
    digests: tuple[str, ...] = ()  # what it reads; () for a request waiting on another's read of its blocks


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


class DiskTier:
    def __init__(self, config, runner, block_manager: BlockManager):
        from ..loader.hf_loader import gguf_source
        self.block_manager = block_manager
        self.kv = runner.kv_cache
        self.block_size = config.block_size
        self.write_behind = config.disk_cache_write_behind
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
        self.parked: dict[str, DiskLoad] = {}
        self.reading: dict[str, object] = {}  # digest -> the read bringing it in
        self.on_ready = None  # AsyncEngine's wake-up, called from the reader thread
        block_manager.record_new_blocks = True
        block_manager.cache.on_evict = self._write_evicted

    @property
    def stats(self):
        return self.store.stats

    @property
    def enabled(self) -> bool:
        return self.store.enabled

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
        tokens = [tuple(seq.token_ids[i * bs:(i + 1) * bs]) for i in range(first, first + count)]
        load = DiskLoad(request, first, self.store.read_async(digests[first:first + count], tokens, self.expected),
                        tuple(digests[first:first + count]))
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
            for digest in load.digests:
                self.reading.pop(digest, None)
            if not load.digests:
                if not self.park(load.request):  # parked again if more of its blocks are on disk
                    ready.append(load.request)
                continue
            try:
                blocks = load.future.result()
            except Exception:
                logger.exception("disk tier: reading blocks back failed")
                blocks = []
            if blocks and not self._install(load.request.sequences[0], load.first, blocks):
                self.parked[request_id] = load  # every block is in use: try again after the next step
                continue
            ready.append(load.request)
        return ready

    def _install(self, seq, first: int, blocks: list[BlockFile]) -> bool:
        """Copy the blocks read into device blocks; False when no block is free now (the request could not
        be admitted either: running sequences hold every block)."""
        hits = self.block_manager.match_prefix(seq)
        if len(hits) < first:
            return True  # blocks before the read ones left memory meanwhile: the chain is broken
        blocks = blocks[len(hits) - first:]  # some may have been computed meanwhile
        if not blocks:
            return True
        if not self.block_manager.num_free_blocks:
            return False
        ops = BlockOps()
        placed = self.block_manager.install_cached(hits[-1].uid if hits else None, [b.token_ids for b in blocks],
                                                   seq.request.prefix_key, ops)
        self.kv.apply(ops)  # evictions to the CPU tier and zeroing first: then the blocks' contents
        for (entry, device_block), block in zip(placed, blocks):
            entry.digest = block.digest
            for pool, data in zip(self.kv.pools, block.arrays):
                pool[:, :, device_block].copy_(data)
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
            load.future.cancel()

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
                self._write(entry, self.kv.pools, entry.device_block)

    def _write_evicted(self, entry, where: str, index: int) -> None:
        # Called while the evicted copy is intact (before the step reuses its block or slot).
        if entry.digest is not None and self.store.enabled and not self.store.contains(entry.digest):
            self._write(entry, self.kv.pools if where == "device" else self.kv.cpu_pools, index)

    def _write(self, entry, pools: list[torch.Tensor], index: int) -> None:
        arrays = [p[:, :, index].clone(memory_format=torch.contiguous_format).cpu() for p in pools]
        self.store.write_async(BlockFile(digest=entry.digest, token_ids=entry.key[1], arrays=arrays))

    def shutdown(self) -> None:
        for load in self.parked.values():
            load.future.cancel()
        self.store.shutdown()
