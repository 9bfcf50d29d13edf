"""After each sampled token: incremental detokenization, stop checks, and the RequestOutput deltas.

Stop strings never reach the caller: text is searched for them as it grows, cut at the match, and
while streaming the tail that could still become a stop string is held back until it cannot.
"""
from __future__ import annotations

import time

from ..outputs import CompletionOutput, RequestOutput
from .byte_stream import ByteLevelDecoder, ByteStream
from .sequence import Request, Sequence, SequenceStatus


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: tuple[int, ...], max_model_len: int, tokenizer_lock):
        self.tokenizer = tokenizer
        self.tokenizer_lock = tokenizer_lock
        self.decode = token_decoder(tokenizer) if tokenizer is not None else None
        # The Rust tokenizer's own incremental decoder where it decodes as `self.decode` does: one decode
        # per token in Rust instead of two through Python (64 sequences: ~190 -> ~55 us a step).
        self.stream_backend = stream_backend(tokenizer, self.decode)
        # Byte-level BPE tokenizers: the same stream in Python, where it gives the same pieces (byte_stream.py).
        self.byte_decoder = ByteLevelDecoder.for_tokenizer(self.stream_backend) \
            if self.stream_backend is not None else None
        self.eos_token_ids = set(eos_token_ids)
        self.max_model_len = max_model_len

    def append_token(self, seq: Sequence, token: int, logprobs: dict[int, float] | None = None) -> None:
        # (runs for every sequence every step: locals, not the Sequence properties, for the counts)
        params = seq.request.params
        token_ids = seq.token_ids
        token_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
            seq.cumulative_logprob += logprobs.get(token, 0.0)
        num_output = len(token_ids) - seq.num_prompt_tokens
        # EOS, stop ids and stop strings count only after min_tokens (the sampler bans the ids).
        may_stop = num_output > params.min_tokens
        is_stop_token = (token in params.stop_token_ids) or (not params.ignore_eos and token in self.eos_token_ids)
        if is_stop_token and may_stop:
            self.finish(seq, "stop", stop_reason=token)
            return
        checked_len = len(seq.text)
        self._detokenize(seq)
        if params.stop and may_stop and self._check_stop_strings(seq, checked_len):
            return
        if num_output >= params.max_tokens or len(token_ids) >= self.max_model_len:
            self.finish(seq, "length")

    @staticmethod
    def finish(seq: Sequence, reason: str, stop_reason=None) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.stop_reason = stop_reason

    # ---- text ----------------------------------------------------------------------------------
    def _detokenize(self, seq: Sequence) -> None:
        """Decode only a small window of recent tokens: text up to read_offset is final, and the
        window from prefix_offset gives the tokenizer enough context to space words correctly.
        With a stream decoder (DecodeStream runs this same windowed algorithm in Rust) the offsets are
        kept in step with it, so a sequence can leave it for the window here at any token."""
        if self.tokenizer is None:
            return
        stream = seq.detok_stream
        if stream is None and self.stream_backend is not None:
            stream = seq.detok_stream = self._new_stream(seq)
        if stream is not None and stream is not False:
            try:
                if type(stream) is ByteStream:  # (Python only: nothing the tokenizer lock guards)
                    piece = stream.step(seq.token_ids[-1])
                else:
                    with self.tokenizer_lock:
                        piece = stream.step(self.stream_backend, seq.token_ids[-1])
            except Exception:  # e.g. a window whose text does not extend the last one: the Python window
                seq.detok_stream = False
            else:
                if piece is not None:
                    seq.text += piece
                    seq.detok_prefix_offset = seq.detok_read_offset
                    seq.detok_read_offset = seq.num_output_tokens
                return
        out = seq.output_token_ids
        skip = seq.params.skip_special_tokens
        with self.tokenizer_lock:
            prefix = self.decode(out[seq.detok_prefix_offset:seq.detok_read_offset], skip_special_tokens=skip)
            full = self.decode(out[seq.detok_prefix_offset:], skip_special_tokens=skip)
        # A trailing U+FFFD means a multi-byte character is still incomplete: wait for more tokens.
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            seq.text += full[len(prefix):]
            seq.detok_prefix_offset = seq.detok_read_offset
            seq.detok_read_offset = len(out)

    def _new_stream(self, seq: Sequence):
        """A stream decoder for the sequence, or False: a stream starts from an empty window, so only at its
        first output token (the only time the window here is empty before the new token)."""
        if not seq.detok_prefix_offset == seq.detok_read_offset == seq.num_output_tokens - 1:
            return False
        if self.byte_decoder is not None:
            return self.byte_decoder.stream(seq.params.skip_special_tokens)
        from tokenizers.decoders import DecodeStream
        return DecodeStream(skip_special_tokens=seq.params.skip_special_tokens)

    def _check_stop_strings(self, seq: Sequence, checked_len: int) -> bool:
        params = seq.params
        # Only a match ending in the new text is new: earlier text was checked on earlier tokens.
        start = max(0, checked_len - params.max_stop_len + 1)
        best = None
        for stop in params.stop:
            idx = seq.text.find(stop, start)
            if idx != -1 and (best is None or idx < best[0]):
                best = (idx, stop)
        if best is None:
            return False
        idx, stop = best
        seq.text = seq.text[: idx + (len(stop) if params.include_stop_str_in_output else 0)]
        self.finish(seq, "stop", stop_reason=stop)
        return True

    @staticmethod
    def _sendable_text_len(seq: Sequence) -> int:
        """Length of text safe to stream: all of it, minus a tail that is a prefix of a stop string."""
        text, stops = seq.text, seq.params.stop
        if seq.is_finished or not stops:
            return len(text)
        for k in range(min(seq.params.max_stop_len - 1, len(text)), 0, -1):
            tail = text[-k:]
            if any(s.startswith(tail) for s in stops):
                return len(text) - k
        return len(text)

    # ---- outputs -------------------------------------------------------------------------------
    def make_output(self, request: Request) -> RequestOutput:
        completions = []
        num_draft = num_accepted = 0
        params = request.params
        stops, with_logprobs = params.stop, params.logprobs is not None
        all_finished = len(request.sequences) == params.n  # (request.finished, without its generator)
        for seq in request.sequences:
            num_draft += seq.num_draft_tokens
            num_accepted += seq.num_accepted_tokens
            if seq.status is not SequenceStatus.FINISHED:
                all_finished = False
            text, text_sent, tokens_sent = seq.text, seq.num_text_sent, seq.num_tokens_sent
            sendable = max(self._sendable_text_len(seq) if stops else len(text), text_sent)
            out_ids = seq.token_ids[seq.num_prompt_tokens:]  # a new list: the caller may keep it
            completions.append(CompletionOutput(
                seq.index, text if sendable >= len(text) else text[:sendable], out_ids,
                text[text_sent:sendable], out_ids[tokens_sent:], seq.finish_reason, seq.stop_reason,
                list(seq.logprobs) if with_logprobs else None, seq.cumulative_logprob if with_logprobs else None))
            seq.num_text_sent = sendable
            seq.num_tokens_sent = len(out_ids)
        finished = all_finished or request.error is not None
        first = request.sequences[0] if request.sequences else None
        return RequestOutput(
            request_id=request.request_id,
            prompt=request.prompt,
            prompt_token_ids=request.prompt_token_ids,
            outputs=completions,
            finished=finished,
            num_cached_tokens=first.num_cached_tokens if first else 0,
            num_cpu_cached_tokens=first.num_cpu_cached_tokens if first else 0,
            num_disk_cached_tokens=first.num_disk_cached_tokens if first else 0,
            error=request.error,
            error_is_client=request.error_is_client,
            arrival_time=request.arrival_time,
            embedding=request.embedding,
            first_token_time=request.first_token_time,
            finished_time=time.monotonic() if finished else None,
            num_draft_tokens=num_draft,
            num_accepted_tokens=num_accepted,
        )


def stream_backend(tokenizer, decode):
    """The Rust Tokenizer to step DecodeStreams with, or None: where tokenizers has no DecodeStream (before
    0.21), or `decode` is the HF wrapper's (it cleans up spaces, which a stream would not)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None or decode != getattr(backend, "decode", None):  # (bound methods: ==, not is)
        return None
    try:
        from tokenizers.decoders import DecodeStream  # noqa: F401
    except ImportError:
        return None
    return backend


def token_decoder(tokenizer):
    """tokenizer.decode, or the Rust tokenizer's own decode where the HF wrapper would add nothing to it (a
    fast tokenizer without clean-up of spaces): the wrapper's argument conversion costs twice the
    decode of a few tokens, paid twice per token of every running sequence."""
    backend = getattr(tokenizer, "_tokenizer", None)
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return tokenizer.decode
    if not isinstance(backend, Tokenizer) or getattr(tokenizer, "clean_up_tokenization_spaces", True):
        return tokenizer.decode
    return backend.decode
