"""Incremental detokenization for byte-level BPE tokenizers (GPT-2's byte alphabet: SmolLM2, Qwen2, Llama 3)
in plain Python.

Decoding such a tokenizer's ids is concatenating each token's bytes and reading them as UTF-8, so a
stream only has to keep the bytes not yet sent (an incomplete character) and decode what arrives. The
Rust DecodeStream computes the same thing by decoding a window of ids twice per token: inside a step, after
the forward has swept the caches, ~4-5 us a call against ~2 us here (tiny model, 64 sequences: 264-303 ->
110-128 us of detokenization a step).

Used only where it gives DecodeStream's pieces exactly: the tokenizer's decoder is ByteLevel alone, and a
probe of random and byte-sized tokens (special tokens included, kept and skipped) decodes to the same
pieces, call by call, as DecodeStream does; otherwise the engine keeps DecodeStream.
"""
from __future__ import annotations

import random

PROBE_SEQUENCES = 48
PROBE_LENGTH = 24


def byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte -> the byte (the inverse of the byte-to-unicode
    table of byte-level BPE tokenizers; guided decoding reads token bytes with it too)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:  # the others are moved past 255, in byte order
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class ByteLevelDecoder:
    """Token bytes, looked up once per id (lazily: a vocabulary has ~50-150k ids, a server meets far fewer)."""

    def __init__(self, backend):
        self.backend = backend
        self.alphabet = byte_alphabet()
        self.added = backend.get_added_tokens_decoder()  # id -> AddedToken
        self.special = {i for i, t in self.added.items() if t.special}
        self._bytes: dict[int, bytes] = {}

    @classmethod
    def for_tokenizer(cls, backend) -> "ByteLevelDecoder | None":
        """A decoder for the Rust tokenizer `backend`, or None where it would not match DecodeStream."""
        if type(getattr(backend, "decoder", None)).__name__ != "ByteLevel":
            return None
        try:
            decoder = cls(backend)
            return decoder if decoder.matches_decode_stream() else None
        except Exception:  # anything unexpected about this tokenizer: the Rust stream it is
            return None

    def token_bytes(self, token: int) -> bytes:
        got = self._bytes.get(token)
        if got is None:
            text = self.backend.id_to_token(token)
            if text is None:  # an id past the vocabulary (a padded LM head): decodes to nothing
                got = b""
            elif token in self.added:  # added tokens (special ones where kept) read as their text
                got = self.added[token].content.encode()
            else:
                alphabet = self.alphabet
                got = bytes(alphabet[c] for c in text) if all(c in alphabet for c in text) else text.encode()
            self._bytes[token] = got
        return got

    def stream(self, skip_special_tokens: bool) -> "ByteStream":
        return ByteStream(self, skip_special_tokens)

    def matches_decode_stream(self) -> bool:
        from tokenizers.decoders import DecodeStream
        size = self.backend.get_vocab_size(with_added_tokens=True)
        byte_ids = [i for i in (self.backend.token_to_id(c) for c in self.alphabet) if i is not None]
        pool = byte_ids + sorted(self.added) + [size, size + 7]  # partial characters, added tokens, ids past the end
        rng = random.Random(0)
        for n in range(PROBE_SEQUENCES):
            ids = [rng.choice(pool) if rng.random() < 0.5 else rng.randrange(size) for _ in range(PROBE_LENGTH)]
            skip = n % 2 == 0
            ours, theirs = self.stream(skip), DecodeStream(skip_special_tokens=skip)
            for token in ids:
                if ours.step(token) != theirs.step(self.backend, token):
                    return False
        return True


class ByteStream:
    """The text of one sequence's output tokens, piece by piece: step() returns the new text, or None while
    the bytes so far end in an incomplete character (or add no text), as DecodeStream.step does."""

    __slots__ = ("decoder", "skip", "pending")

    def __init__(self, decoder: ByteLevelDecoder, skip_special_tokens: bool):
        self.decoder = decoder
        self.skip = skip_special_tokens
        self.pending = b""

    def step(self, token: int) -> str | None:
        if self.skip and token in self.decoder.special:
            return None
        pending = self.pending + self.decoder.token_bytes(token)
        text = pending.decode("utf-8", "replace")
        if not text or text.endswith("\ufffd"):  # (U+FFFD last: a character still incomplete)
            self.pending = pending
            return None
        self.pending = b""
        return text
