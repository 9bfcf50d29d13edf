"""Incremental detokenization: the Python byte stream (byte-level BPE tokenizers) and the tokenizer's
DecodeStream (one Rust decode per token) give the same text, token by token, as the windowed Python decode,
and a sequence leaves the Rust stream for that window mid-way without losing or repeating text."""
from __future__ import annotations

import random
import threading

import pytest

from dashinfer_core import SamplingParams
from dashinfer_core.engine.output_processor import OutputProcessor
from dashinfer_core.engine.sequence import Request, Sequence

TEXTS = ["The capital of France is Paris. Ça coûte 12 €, naïve café!",
         "東京は日本の首都です。😀🎉 emoji and 中文 mixed with English words.",
         "Tabs\tand\nnewlines,   spaces; ```code``` <b>tags</b> and ünïcödé."]


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(default_model_dir))


def processor(tokenizer, route: str) -> OutputProcessor:
    """route: "bytes" (byte_stream.py, what this tokenizer takes), "rust" (the tokenizer's DecodeStream) or
    "window" (the Python window)."""
    proc = OutputProcessor(tokenizer, eos_token_ids=(), max_model_len=1 << 20, tokenizer_lock=threading.Lock())
    assert proc.stream_backend is not None, "this tokenizer/tokenizers version should take the stream route"
    assert proc.byte_decoder is not None, "a byte-level BPE tokenizer should take the Python byte stream"
    if route != "bytes":
        proc.byte_decoder = None
    if route == "window":
        proc.stream_backend = None
    return proc


def new_seq(skip_special: bool = True) -> Sequence:
    params = SamplingParams(max_tokens=1 << 20, ignore_eos=True, skip_special_tokens=skip_special)
    request = Request("r", None, [1, 2, 3], params, seed=0)
    seq = Sequence(request=request, index=0, token_ids=[1, 2, 3], num_prompt_tokens=3)
    request.sequences.append(seq)
    return seq


def texts_after_each_token(proc: OutputProcessor, ids: list[int], skip_special: bool = True,
                           seq: Sequence | None = None) -> list[str]:
    seq = seq or new_seq(skip_special)
    seen = []
    for token in ids:
        proc.append_token(seq, token)
        seen.append(seq.text)
    return seen


@pytest.mark.parametrize("route", ["bytes", "rust"])
@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_the_window_and_the_whole_decode(tokenizer, text, route):
    ids = tokenizer.encode(text, add_special_tokens=False)
    streamed = texts_after_each_token(processor(tokenizer, route), ids)
    windowed = texts_after_each_token(processor(tokenizer, "window"), ids)
    assert streamed == windowed
    assert streamed[-1] == tokenizer.decode(ids) == text


@pytest.mark.parametrize("route", ["bytes", "rust"])
@pytest.mark.parametrize("skip_special", [True, False])
def test_random_ids_with_partial_characters_and_special_tokens(tokenizer, skip_special, route):
    """Random ids of a byte-level vocabulary cut UTF-8 characters anywhere; special ids in between."""
    rng = random.Random(7)
    specials = tokenizer.all_special_ids
    for trial in range(20):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tokenizer))
               for _ in range(rng.randrange(1, 60))]
        streamed = texts_after_each_token(processor(tokenizer, route), ids, skip_special)
        windowed = texts_after_each_token(processor(tokenizer, "window"), ids, skip_special)
        assert streamed == windowed, (trial, ids)


@pytest.mark.parametrize("skip_special", [True, False])
def test_byte_stream_gives_decode_streams_pieces_call_by_call(tokenizer, skip_special):
    """Single bytes (characters cut anywhere, invalid UTF-8), every added token and ids past the vocabulary,
    mixed with random ones: the Python byte stream returns what DecodeStream returns, None included."""
    from tokenizers.decoders import DecodeStream

    from dashinfer_core.engine.byte_stream import ByteLevelDecoder, byte_alphabet
    backend = tokenizer._tokenizer
    decoder = ByteLevelDecoder.for_tokenizer(backend)
    assert decoder is not None
    single_bytes = [i for i in map(backend.token_to_id, byte_alphabet()) if i is not None]
    assert len(single_bytes) > 200
    pool = single_bytes + list(backend.get_added_tokens_decoder()) + [len(tokenizer) + 3]
    rng = random.Random(11)
    for trial in range(30):
        ids = [rng.choice(pool) if rng.random() < 0.6 else rng.randrange(len(tokenizer)) for _ in range(80)]
        ours, theirs = decoder.stream(skip_special), DecodeStream(skip_special_tokens=skip_special)
        assert [ours.step(t) for t in ids] == [theirs.step(backend, t) for t in ids], (trial, ids)


def test_byte_stream_is_refused_where_it_would_differ(tokenizer, monkeypatch):
    """The decoder is built only after its probe matches DecodeStream: a wrong byte table, or a tokenizer whose
    decoder is not ByteLevel, keeps the Rust stream."""
    from tokenizers import Tokenizer, decoders, models

    from dashinfer_core.engine import byte_stream
    backend = tokenizer._tokenizer
    word_level = Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    word_level.decoder = decoders.WordPiece()
    assert byte_stream.ByteLevelDecoder.for_tokenizer(word_level) is None
    right = byte_stream.ByteLevelDecoder.token_bytes
    wrong_id = backend.token_to_id("\u0100")  # the stand-in for byte 0x00

    def one_byte_wrong(self, token):
        return b"?" if token == wrong_id else right(self, token)
    monkeypatch.setattr(byte_stream.ByteLevelDecoder, "token_bytes", one_byte_wrong)
    assert byte_stream.ByteLevelDecoder.for_tokenizer(backend) is None
    proc = OutputProcessor(tokenizer, eos_token_ids=(), max_model_len=1 << 20, tokenizer_lock=threading.Lock())
    assert proc.byte_decoder is None and proc.stream_backend is not None  # the Rust stream, as before


def test_a_stream_that_fails_hands_over_to_the_window(tokenizer):
    """If the Rust stream raises (say a window whose text does not extend the previous one), the sequence
    goes on with the Python window from the same offsets: no text lost or repeated."""
    from tokenizers.decoders import DecodeStream

    class FailingStream:
        def __init__(self, after: int):
            self.inner, self.left = DecodeStream(skip_special_tokens=True), after

        def step(self, backend, token):
            self.left -= 1
            if self.left < 0:
                raise RuntimeError("invalid prefix")
            return self.inner.step(backend, token)

    ids = tokenizer.encode(TEXTS[1], add_special_tokens=False)
    windowed = texts_after_each_token(processor(tokenizer, "window"), ids)
    for after in (0, 1, 5, len(ids) // 2):
        seq = new_seq()
        seq.detok_stream = FailingStream(after)
        handed = texts_after_each_token(processor(tokenizer, "rust"), ids, seq=seq)
        assert seq.detok_stream is False
        assert handed == windowed


def test_stream_route_is_off_where_decode_cleans_up_spaces(tokenizer):
    """A tokenizer whose decode cleans up spaces keeps the HF wrapper's decode: a stream would not clean."""
    import copy
    cleaning = copy.copy(tokenizer)
    cleaning.clean_up_tokenization_spaces = True
    proc = OutputProcessor(cleaning, eos_token_ids=(), max_model_len=1 << 20, tokenizer_lock=threading.Lock())
    assert proc.stream_backend is None
    ids = tokenizer.encode("Hello , world !", add_special_tokens=False)
    assert texts_after_each_token(proc, ids)[-1] == cleaning.decode(ids)
