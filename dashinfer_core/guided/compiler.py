"""Compiles guided specs into outlines-core indexes, off the step loop.

The vocabulary is built once per engine from the tokenizer (token strings mapped back to their
bytes). Each distinct pattern is compiled once, on a small thread pool (outlines-core releases the
GIL while it builds an index, so the step loop keeps running), and kept in an LRU cache. Requests
wait in the queue until their index is ready; one that waits longer than the timeout fails alone.
A compile that overruns cannot be interrupted, but the pool is small, so runaway compiles cannot
multiply.

Indexes that took a while to build are also kept on disk (IndexDiskCache), keyed by the pattern, the
vocabulary and the outlines-core version, so a restarted engine loads them instead of building them
again (json_object with SmolLM2: ~0.3 s to build, ~10 ms to load).
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import tempfile
import threading
import time
from array import array
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from outlines_core import Index, Vocabulary  # at import, not on a compile thread (see spec.py)

from ..engine.byte_stream import byte_alphabet
from ..errors import InvalidParameterError

logger = logging.getLogger(__name__)

DISK_CACHE_FORMAT = 1
DISK_CACHE_MAX_BYTES = 256 * 1024 * 1024
# Larger indexes are not written (json_object's is ~6 MB; a pathological schema's can pass 200 MB).
DISK_CACHE_MAX_FILE_BYTES = 32 * 1024 * 1024
# Indexes that build faster than this are not worth a file (a small schema's index is still megabytes).
PERSIST_MIN_SECONDS = 0.05


def token_bytes_map(tokenizer, vocab_size: int, eos_token_id: int) -> dict[bytes, list[int]]:
    """{token bytes: [ids]} for every ordinary token id < vocab_size (special tokens and EOS left out)."""
    byte_decoder = byte_alphabet()
    # Byte-level tokens go through str.translate + latin-1 (C speed) instead of a per-character loop.
    to_latin1 = str.maketrans({c: chr(b) for c, b in byte_decoder.items()})
    not_byte_level = re.compile("[^" + "".join(re.escape(c) for c in byte_decoder) + "]")
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | {eos_token_id}
    mapping: dict[bytes, list[int]] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id >= vocab_size or token_id in special:
            continue
        if not_byte_level.search(text) is None:  # byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2)
            data = text.translate(to_latin1).encode("latin-1")
        elif text.startswith("<0x") and text.endswith(">") and len(text) == 6:  # SentencePiece byte token
            data = bytes([int(text[3:5], 16)])
        else:  # SentencePiece piece: ▁ marks a space
            data = text.replace("\u2581", " ").encode("utf-8")
        mapping.setdefault(data, []).append(token_id)
    return mapping


def vocabulary_fingerprint(token_bytes: dict[int, bytes], eos_token_id: int) -> str:
    """A hash of every (id, bytes) pair and the EOS id: two vocabularies with the same fingerprint
    give the same index for a pattern."""
    size = max(token_bytes, default=-1) + 1
    by_id = [b""] * size
    lengths = array("q", [-1]) * size  # -1: no ordinary token with this id
    for token_id, data in token_bytes.items():
        by_id[token_id] = data
        lengths[token_id] = len(data)
    digest = hashlib.sha256(f"eos={eos_token_id};n={size};".encode())
    digest.update(lengths.tobytes())
    digest.update(b"".join(by_id))
    return digest.hexdigest()


@functools.lru_cache(maxsize=1)
def _outlines_core_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("outlines_core")
    except PackageNotFoundError:
        return "unknown"


def default_disk_cache_dir() -> Path | None:
    """$DASHINFER_CACHE/guided (default ~/.cache/dashinfer-core/guided); None when
    DASHINFER_GUIDED_DISK_CACHE is 0/off/false/no."""
    if os.environ.get("DASHINFER_GUIDED_DISK_CACHE", "1").strip().lower() in ("0", "off", "false", "no"):
        return None
    from ..loader.default_model import cache_root
    return cache_root() / "guided"


class IndexDiskCache:
    """Compiled indexes as files `<key>.idx`: a magic line, the SHA-256 of the payload, then
    outlines-core's own serialization of the Index (what its pickle support uses; no pickle here, so
    loading a file runs no code). Written to a temporary file and renamed into place, so readers
    never see half a file; a file that fails its checksum or does not deserialize is deleted. The
    folder is kept under max_bytes by deleting the least recently used files; an index whose file
    would exceed max_file_bytes is not written."""

    MAGIC = b"dashinfer-guided-index\n"

    def __init__(self, directory: str | os.PathLike, max_bytes: int = DISK_CACHE_MAX_BYTES,
                 max_file_bytes: int = DISK_CACHE_MAX_FILE_BYTES):
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.max_file_bytes = max_file_bytes
        self.num_loads = 0
        self.num_stores = 0
        self.num_corrupt = 0

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.idx"

    def load(self, key: str):
        path = self.path(key)
        try:
            data = path.read_bytes()
        except OSError:  # absent (the usual case) or unreadable
            return None
        head = len(self.MAGIC)
        payload = data[head + 32:]
        index = None
        if data[:head] == self.MAGIC and hashlib.sha256(payload).digest() == data[head:head + 32]:
            try:
                index = Index.from_binary(payload)
            except Exception:  # noqa: BLE001 - outlines-core raises ValueError; any failure means unusable
                index = None
        if index is None:
            self.num_corrupt += 1
            logger.warning("guided index cache: %s is corrupt; deleted", path)
            self._unlink(path)
            return None
        try:
            os.utime(path)  # recently used: pruned last
        except OSError:
            pass
        self.num_loads += 1
        return index

    def store(self, key: str, index) -> bool:
        payload = self._serialize(index)
        if payload is None or len(payload) > self.max_file_bytes:
            return False
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=".tmp-", suffix=".idx")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(self.MAGIC + hashlib.sha256(payload).digest() + payload)
                os.replace(tmp, self.path(key))
            except BaseException:
                self._unlink(Path(tmp))
                raise
        except OSError as exc:
            logger.warning("guided index cache: could not write to %s: %s", self.directory, exc)
            return False
        self.num_stores += 1
        self.prune()
        return True

    def prune(self) -> None:
        """Delete least recently used files until the folder holds at most max_bytes; also leftover
        temporary files over an hour old (a writer that died)."""
        entries = []
        now = time.time()
        try:
            for path in self.directory.iterdir():
                try:
                    st = path.stat()
                except OSError:
                    continue
                if path.name.startswith(".tmp-"):
                    if now - st.st_mtime > 3600:
                        self._unlink(path)
                elif path.suffix == ".idx":
                    entries.append((st.st_mtime, st.st_size, path))
        except OSError:
            return
        total = sum(size for _, size, _ in entries)
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            self._unlink(path)
            total -= size

    @staticmethod
    def _serialize(index) -> bytes | None:
        # outlines-core 0.2 pickles an Index as (Index.from_binary, (bytes,)).
        try:
            func, args = index.__reduce__()[:2]
        except Exception:  # noqa: BLE001 - a version without it: no disk cache
            return None
        if func != Index.from_binary or len(args) != 1 or not isinstance(args[0], bytes):
            return None
        return args[0]

    @staticmethod
    def _unlink(path: Path) -> None:
        try:
            path.unlink()
        except OSError:
            pass


class GuidedCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int, max_workers: int = 2,
                 cache_size: int = 256, disk_cache: IndexDiskCache | None = None,
                 persist_min_seconds: float = PERSIST_MIN_SECONDS):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.cache_size = cache_size
        self.disk_cache = disk_cache
        self.persist_min_seconds = persist_min_seconds
        self._vocabulary = None
        self.vocabulary_fingerprint: str | None = None
        self.token_bytes: dict[int, bytes] = {}  # id -> bytes, for jump-forward
        self._vocabulary_lock = threading.Lock()  # not self._lock: submit() must not wait for a build
        self._lock = threading.Lock()
        self._indexes: OrderedDict[str, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="guided-compile")
        # Counters: patterns submitted that were already cached / compiled here / loaded from disk.
        self.num_cache_hits = 0
        self.num_built = 0
        self.num_disk_hits = 0

    def vocabulary(self):
        with self._vocabulary_lock:
            if self._vocabulary is None:
                if self.tokenizer is None:
                    raise InvalidParameterError("guided decoding", "needs a tokenizer (skip_tokenizer_init is set)")
                mapping = token_bytes_map(self.tokenizer, self.vocab_size, self.eos_token_id)
                token_bytes = {i: data for data, ids in mapping.items() for i in ids}
                self.vocabulary_fingerprint = vocabulary_fingerprint(token_bytes, self.eos_token_id)
                self.token_bytes = token_bytes
                self._vocabulary = Vocabulary(self.eos_token_id, mapping)
            return self._vocabulary

    def submit(self, regex: str) -> Future:
        """A future of the outlines-core Index for `regex`; compiled at most once while cached."""
        with self._lock:
            future = self._indexes.get(regex)
            if future is not None:
                self._indexes.move_to_end(regex)
                self.num_cache_hits += 1
                return future
            future = self._pool.submit(self._compile, regex)
            self._indexes[regex] = future
            while len(self._indexes) > self.cache_size:
                self._indexes.popitem(last=False)
            return future

    def disk_key(self, regex: str) -> str:
        """The disk cache's name for `regex` compiled against this vocabulary (builds the vocabulary)."""
        self.vocabulary()
        text = f"{DISK_CACHE_FORMAT}\0{_outlines_core_version()}\0{self.vocabulary_fingerprint}\0{regex}"
        return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()

    def _compile(self, regex: str):
        vocabulary = self.vocabulary()
        key = self.disk_key(regex) if self.disk_cache is not None else None
        if key is not None:
            index = self.disk_cache.load(key)
            if index is not None:
                self.num_disk_hits += 1
                return index
        start = time.perf_counter()
        index = Index(regex, vocabulary)
        self.num_built += 1
        if key is not None and time.perf_counter() - start >= self.persist_min_seconds:
            self.disk_cache.store(key, index)
        return index

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
