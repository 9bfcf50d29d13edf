"""Compiles guided specs into outlines-core indexes, off the step loop.

The vocabulary is built once per engine from the tokenizer (token strings mapped back to their
bytes). Each distinct pattern is compiled once, on a small thread pool (outlines-core releases the
GIL while it builds an index, so the step loop keeps running), and kept in an LRU cache. Requests
wait in the queue until their index is ready; one that waits longer than the timeout fails alone.
A compile that overruns cannot be interrupted, but the pool is small, so runaway compiles cannot
multiply.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import InvalidParameterError


def _gpt2_byte_decoder() -> dict[str, int]:
    """The inverse of GPT-2's byte-to-unicode table used by byte-level BPE tokenizers."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def token_bytes_map(tokenizer, vocab_size: int, eos_token_id: int) -> dict[bytes, list[int]]:
    """{token bytes: [ids]} for every ordinary token id < vocab_size (special tokens and EOS left out)."""
    byte_decoder = _gpt2_byte_decoder()
    special = set(getattr(tokenizer, "all_special_ids", []) or []) | {eos_token_id}
    mapping: dict[bytes, list[int]] = {}
    for text, token_id in tokenizer.get_vocab().items():
        if token_id >= vocab_size or token_id in special:
            continue
        if all(c in byte_decoder for c in text):  # byte-level BPE (GPT-2, Llama 3, Qwen, SmolLM2)
            data = bytes(byte_decoder[c] for c in text)
        elif text.startswith("<0x") and text.endswith(">") and len(text) == 6:  # SentencePiece byte token
            data = bytes([int(text[3:5], 16)])
        else:  # SentencePiece piece: ▁ marks a space
            data = text.replace("\u2581", " ").encode("utf-8")
        mapping.setdefault(data, []).append(token_id)
    return mapping


class GuidedCompiler:
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int, max_workers: int = 2,
                 cache_size: int = 256):
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_id = eos_token_id
        self.cache_size = cache_size
        self._vocabulary = None
        self.token_bytes: dict[int, bytes] = {}  # id -> bytes, for jump-forward
        self._lock = threading.Lock()
        self._indexes: OrderedDict[str, Future] = OrderedDict()
        self._pool = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="guided-compile")

    def vocabulary(self):
        with self._lock:
            if self._vocabulary is None:
                from outlines_core import Vocabulary
                if self.tokenizer is None:
                    raise InvalidParameterError("guided decoding", "needs a tokenizer (skip_tokenizer_init is set)")
                mapping = token_bytes_map(self.tokenizer, self.vocab_size, self.eos_token_id)
                self.token_bytes = {i: data for data, ids in mapping.items() for i in ids}
                self._vocabulary = Vocabulary(self.eos_token_id, mapping)
            return self._vocabulary

    def submit(self, regex: str) -> Future:
        """A future of the outlines-core Index for `regex`; compiled at most once while cached."""
        with self._lock:
            future = self._indexes.get(regex)
            if future is not None:
                self._indexes.move_to_end(regex)
                return future
            future = self._pool.submit(self._compile, regex)
            self._indexes[regex] = future
            while len(self._indexes) > self.cache_size:
                self._indexes.popitem(last=False)
            return future

    def _compile(self, regex: str):
        from outlines_core import Index
        return Index(regex, self.vocabulary())

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
