"""The prefix cache's disk tier, as files: one KV block per file, written behind on a thread, read back
on another, kept under a byte budget.

A file is named `<fingerprint>-<chain digest>.kvb`. The fingerprint stands for everything that shapes a
block's K and V (model weights, dtype, KV dtype, quantization, block size, tensor-parallel rank and
size); the chain digest for the block's tokens and every block before it (disk_tier.py). Layout:

    MAGIC | header length (u32 little-endian) | header (JSON) | payload | CRC-32 of header and payload (u32)

The header repeats the fingerprint, the digest and the block's token ids, and gives each array's dtype
and shape; a file whose header, length or checksum does not match is deleted and counts as a miss, so a
corrupted, truncated or foreign file is never served. Files are written under a temporary name and
renamed, so readers (this engine's or another engine's on the same directory) never see half a file.
Least recently used files (by modification time: a read touches it) go first when the directory
passes its budget. An OSError while writing (a full disk, a directory that cannot be written) turns the
tier off with a warning; serving goes on without it.
"""
from __future__ import annotations

import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)

MAGIC = b"DIKVBLK1"
SUFFIX = ".kvb"
TEMP_SUFFIX = ".tmp"
STALE_TEMP_S = 3600.0  # a temporary file this old was left by a writer that died
MAX_PENDING_BYTES = 256 << 20  # writes queued beyond this are dropped (the step loop never waits on the disk)


@dataclass
class DiskStats:
    writes: int = 0
    write_bytes: int = 0
    writes_dropped: int = 0  # queue full, or the tier turned off
    reads: int = 0  # blocks read back and verified
    read_misses: int = 0  # a file gone between the lookup and the read
    corrupted: int = 0  # files deleted because their header, length or checksum was wrong
    evictions: int = 0  # files deleted to stay under the budget
    hit_tokens: int = 0  # prompt tokens served from disk (counted by the tier)


@dataclass
class BlockFile:
    """What one file holds: the block's arrays (K/V data, and scales and zero points when quantized),
    in the order of KVCache.pools, each [layers, 2, kv heads, block_size, width]."""
    digest: str
    token_ids: tuple[int, ...]
    arrays: list[torch.Tensor]


def encode_header(fingerprint: str, block: BlockFile) -> bytes:
    header = {"fingerprint": fingerprint, "digest": block.digest, "tokens": list(block.token_ids),
              "arrays": [[str(a.dtype), list(a.shape)] for a in block.arrays]}
    return json.dumps(header, separators=(",", ":")).encode()


def _raw(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


class DiskStore:
    def __init__(self, directory: str, budget_bytes: int, fingerprint: str, name_prefix: str):
        self.directory = directory
        self.budget_bytes = budget_bytes
        self.fingerprint = fingerprint
        self.name_prefix = name_prefix  # a short hash of the fingerprint: the first part of every file name
        self.stats = DiskStats()
        self.enabled = True
        self.disabled_reason: str | None = None
        self._lock = threading.Lock()
        self._known: set[str] = set()  # digests this engine wrote or read (the rest: a stat tells)
        self._pending_bytes = 0
        self._dir_bytes = 0
        try:
            os.makedirs(directory, exist_ok=True)
            probe = os.path.join(directory, f".probe-{os.getpid()}-{threading.get_ident()}{TEMP_SUFFIX}")
            with open(probe, "wb") as f:
                f.write(b"ok")
            os.unlink(probe)
            self._dir_bytes = self._enforce_budget(0)
        except OSError as exc:
            self._turn_off(f"cannot write to disk_cache_dir {directory!r}: {exc}")
        self._writes: queue.Queue = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="dashinfer-disk-writer", daemon=True)
        self._writer.start()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dashinfer-disk-reader")

    # ---- names ---------------------------------------------------------------------------------
    def path_of(self, digest: str) -> str:
        return os.path.join(self.directory, f"{self.name_prefix}-{digest}{SUFFIX}")

    def contains(self, digest: str) -> bool:
        """Whether a file for `digest` exists now (it may still turn out corrupted when read)."""
        if not self.enabled:
            return False
        return digest in self._known or os.path.exists(self.path_of(digest))

    # ---- writing (behind the step loop) ---------------------------------------------------------
    def write_async(self, block: BlockFile) -> bool:
        """Queue a block (its arrays already copied off the cache) for writing; False if dropped."""
        size = sum(a.numel() * a.element_size() for a in block.arrays)
        with self._lock:
            if not self.enabled or block.digest in self._known or self._pending_bytes + size > MAX_PENDING_BYTES:
                self.stats.writes_dropped += 1
                return False
            self._known.add(block.digest)  # no second copy queued while this one is
            self._pending_bytes += size
        self._writes.put((block, size))
        return True

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until the queued writes are on disk (or dropped); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._pending_bytes == 0:
                    return True
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.005)

    def _write_loop(self) -> None:
        while True:
            item = self._writes.get()
            if item is None:
                return
            block, size = item
            try:
                if self.enabled:
                    self._write(block)
                else:
                    self.stats.writes_dropped += 1
            except OSError as exc:
                self._turn_off(f"writing to disk_cache_dir {self.directory!r} failed: {exc}")
                with self._lock:
                    self._known.discard(block.digest)
                self.stats.writes_dropped += 1
            except Exception:  # never let one bad block stop the writer
                logger.exception("disk tier: writing a block failed")
                with self._lock:
                    self._known.discard(block.digest)
            finally:
                with self._lock:
                    self._pending_bytes -= size

    def _write(self, block: BlockFile) -> None:
        path = self.path_of(block.digest)
        if os.path.exists(path):  # another engine on this directory wrote it: keep its copy
            return
        header = encode_header(self.fingerprint, block)
        prefix = MAGIC + struct.pack("<I", len(header)) + header
        crc = zlib.crc32(header)
        raws = [_raw(a) for a in block.arrays]
        for raw in raws:
            crc = zlib.crc32(raw, crc)
        size = len(prefix) + sum(len(r) for r in raws) + 4
        if self._dir_bytes + size > self.budget_bytes:
            self._dir_bytes = self._enforce_budget(size)
        temp = f"{path}.{os.getpid()}.{threading.get_ident()}{TEMP_SUFFIX}"
        try:
            with open(temp, "wb") as f:
                f.write(prefix)
                for raw in raws:
                    f.write(raw)
                f.write(struct.pack("<I", crc))
            os.replace(temp, path)  # atomic: a reader sees the whole file or none
        except BaseException:
            try:
                os.unlink(temp)
            except OSError:
                pass
            raise
        self._dir_bytes += size
        self.stats.writes += 1
        self.stats.write_bytes += size

    def _enforce_budget(self, incoming: int) -> int:
        """Delete least recently used block files (any fingerprint: the budget is the directory's) until
        the directory holds at most budget - incoming bytes; returns the bytes it holds then."""
        files, total, now = [], 0, time.time()
        with os.scandir(self.directory) as entries:
            for entry in entries:
                try:
                    stat = entry.stat()
                except FileNotFoundError:
                    continue
                if entry.name.endswith(TEMP_SUFFIX):
                    if now - stat.st_mtime > STALE_TEMP_S:
                        self._unlink(entry.path)
                    continue
                if entry.name.endswith(SUFFIX):
                    files.append((stat.st_mtime, stat.st_size, entry.path))
                    total += stat.st_size
        files.sort()
        limit = max(0, self.budget_bytes - incoming)
        for _, size, path in files:
            if total <= limit:
                break
            self._unlink(path)
            total -= size
            self.stats.evictions += 1
            with self._lock:
                self._known.discard(os.path.basename(path)[len(self.name_prefix) + 1:-len(SUFFIX)])
        return total

    # ---- reading (off the step loop) -----------------------------------------------------------
    def read_async(self, digests: list[str], token_ids: list[tuple[int, ...]], expected: list[tuple]) -> Future:
        """Read the blocks `digests` (in chain order) on the reader thread. The future's result: the
        BlockFiles of the leading run that was present and intact (possibly none)."""
        return self._reader.submit(self._read_run, digests, token_ids, expected)

    def _read_run(self, digests, token_ids, expected) -> list[BlockFile]:
        blocks = []
        for digest, tokens in zip(digests, token_ids):
            block = self._read(digest, tokens, expected)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def _read(self, digest: str, tokens: tuple[int, ...], expected: list[tuple]) -> BlockFile | None:
        """expected: (dtype, shape) of each array. None for a missing file; a bad one is deleted."""
        path = self.path_of(digest)
        try:
            with open(path, "rb") as f:
                data = f.read()
            os.utime(path)  # least recently used goes first: a read counts as a use
        except FileNotFoundError:
            self.stats.read_misses += 1
            return None
        except OSError as exc:
            logger.warning("disk tier: reading %s failed: %s", path, exc)
            return None
        block = self._decode(data, digest, tokens, expected)
        if block is None:
            self.stats.corrupted += 1
            logger.warning("disk tier: %s is corrupted, truncated or not this engine's: deleted", path)
            self._unlink(path)
            with self._lock:
                self._known.discard(digest)
            return None
        self.stats.reads += 1
        with self._lock:
            self._known.add(digest)
        return block

    def _decode(self, data: bytes, digest: str, tokens: tuple[int, ...], expected: list[tuple]) -> BlockFile | None:
        if len(data) < len(MAGIC) + 8 or not data.startswith(MAGIC):
            return None
        (header_len,) = struct.unpack_from("<I", data, len(MAGIC))
        start = len(MAGIC) + 4
        if start + header_len + 4 > len(data):
            return None
        try:
            header = json.loads(data[start:start + header_len])
        except ValueError:
            return None
        if not isinstance(header, dict) or header.get("fingerprint") != self.fingerprint or \
                header.get("digest") != digest or tuple(header.get("tokens", ())) != tuple(tokens):
            return None
        specs = header.get("arrays")
        if specs != [[str(dtype), list(shape)] for dtype, shape in expected]:
            return None
        sizes = [torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size() for dtype, shape in expected]
        payload_start = start + header_len
        if payload_start + sum(sizes) + 4 != len(data):
            return None
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(memoryview(data)[start:len(data) - 4]) != crc:
            return None
        arrays, offset = [], payload_start
        buffer = bytearray(memoryview(data)[payload_start:payload_start + sum(sizes)])  # writable, for torch
        for (dtype, shape), size in zip(expected, sizes):
            raw = torch.frombuffer(buffer, dtype=torch.uint8, count=size, offset=offset - payload_start)
            arrays.append(raw.view(dtype).view(shape))
            offset += size
        return BlockFile(digest=digest, token_ids=tuple(tokens), arrays=arrays)

    def discard(self, digest: str) -> None:
        """Delete the file of `digest` (its copy on another rank was lost)."""
        with self._lock:
            self._known.discard(digest)
        self._unlink(self.path_of(digest))

    # ---- off and shutdown ----------------------------------------------------------------------
    def _turn_off(self, reason: str) -> None:
        with self._lock:
            if not self.enabled:
                return
            self.enabled = False
            self.disabled_reason = reason
        logger.warning("disk KV tier turned off, serving goes on without it: %s", reason)

    @staticmethod
    def _unlink(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass  # gone already (another engine), or not ours to delete

    def shutdown(self, flush_timeout: float = 30.0) -> None:
        """Finish the queued writes (so a restarted engine finds them), then stop the threads."""
        self.flush(flush_timeout)
        self._writes.put(None)
        self._writer.join(timeout=5.0)
        self._reader.shutdown(wait=False, cancel_futures=True)
