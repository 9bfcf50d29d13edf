"""Incremental detokenization: the tokenizer's DecodeStream (one Rust decode per token) gives the same text,
token by token, as the windowed Python decode it replaced, and a sequence leaves it for that window
mid-way without losing or repeating text."""
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


def processor(tokenizer, stream: bool) -> OutputProcessor:
    proc = OutputProcessor(tokenizer, eos_token_ids=(), max_model_len=1 << 20, tokenizer_lock=threading.Lock())
    assert proc.stream_backend is not None, "this tokenizer/tokenizers version should take the stream route"
    if not stream:
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


@pytest.mark.parametrize("text", TEXTS)
def test_stream_matches_the_window_and_the_whole_decode(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    streamed = texts_after_each_token(processor(tokenizer, True), ids)
    windowed = texts_after_each_token(processor(tokenizer, False), ids)
    assert streamed == windowed
    assert streamed[-1] == tokenizer.decode(ids) == text


@pytest.mark.parametrize("skip_special", [True, False])
def test_random_ids_with_partial_characters_and_special_tokens(tokenizer, skip_special):
    """Random ids of a byte-level vocabulary cut UTF-8 characters anywhere; special ids in between."""
    rng = random.Random(7)
    specials = tokenizer.all_special_ids
    for trial in range(20):
        ids = [rng.choice(specials) if rng.random() < 0.1 else rng.randrange(len(tokenizer))
               for _ in range(rng.randrange(1, 60))]
        streamed = texts_after_each_token(processor(tokenizer, True), ids, skip_special)
        windowed = texts_after_each_token(processor(tokenizer, False), ids, skip_special)
        assert streamed == windowed, (trial, ids)


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
    windowed = texts_after_each_token(processor(tokenizer, False), ids)
    for after in (0, 1, 5, len(ids) // 2):
        seq = new_seq()
        seq.detok_stream = FailingStream(after)
        handed = texts_after_each_token(processor(tokenizer, True), ids, seq=seq)
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
