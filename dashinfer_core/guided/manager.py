"""Guided requests inside the engine: parked until their index compiles (or times out), a
GuidedState per sequence once running, and after each sampled token the FSM advance, jump-forward
over forced tokens, and the finish when the pattern allows nothing but EOS."""
from __future__ import annotations

import time

from .compiler import GuidedCompiler, IndexDiskCache, default_disk_cache_dir
from .spec import JSON_OBJECT_REGEX
from .state import GuidedState, SmallAllowedSets

_DEFAULT = object()


class GuidedManager:
    def __init__(self, tokenizer, vocab_size: int, eos_token_id: int | None, timeout: float, workers: int,
                 disk_cache_dir=_DEFAULT):
        """disk_cache_dir: where compiled indexes persist across restarts (default
        default_disk_cache_dir(); None: memory only)."""
        self.eos_token_id = eos_token_id if eos_token_id is not None else -1
        if disk_cache_dir is _DEFAULT:
            disk_cache_dir = default_disk_cache_dir()
        disk_cache = IndexDiskCache(disk_cache_dir) if disk_cache_dir is not None else None
        self.compiler = GuidedCompiler(tokenizer, vocab_size, self.eos_token_id, max_workers=workers,
                                       disk_cache=disk_cache)
        self.timeout = timeout
        self.pending: list = []  # requests waiting for their index
        self.on_ready = None  # called (from a compile thread) when an index is done: wakes the loop
        self.num_forced_tokens = 0  # appended by jump-forward, without a sampling step
        self._small_sets: dict[int, SmallAllowedSets] = {}  # id(index) -> its states' small allowed sets

    def precompile_json_object(self):
        """Start compiling the json_object pattern in the background (the engine calls this when it
        starts), so the first json_object request finds it ready; returns its future, or None without
        a tokenizer. Never blocks: the vocabulary is built on the compile thread too."""
        if self.compiler.tokenizer is None:
            return None
        return self.compiler.submit(JSON_OBJECT_REGEX)

    def park(self, request) -> None:
        request.guided_future = self.compiler.submit(request.params.guided_spec.regex)
        request.guided_deadline = time.monotonic() + self.timeout
        if self.on_ready is not None:
            request.guided_future.add_done_callback(lambda _: self.on_ready())
        self.pending.append(request)

    def poll(self):
        """Requests whose index is ready, and (request, error message) for those that failed."""
        ready, failed, still = [], [], []
        now = time.monotonic()
        for request in self.pending:
            future = request.guided_future
            if future.done():
                exc = future.exception()
                if exc is None:
                    ready.append(request)
                else:
                    kind = request.params.guided_spec.kind
                    failed.append((request, f"{kind}: the pattern could not be compiled: {exc}"))
            elif now > request.guided_deadline:
                kind = request.params.guided_spec.kind
                failed.append((request, f"{kind}: compiling the pattern took longer than the "
                                        f"{self.timeout:g} s limit (guided_compile_timeout)"))
            else:
                still.append(request)
        self.pending = still
        return ready, failed

    def has_news(self) -> bool:
        """Some parked request can move on: its index is ready, its compile failed, or it timed out."""
        now = time.monotonic()
        return any(r.guided_future.done() or now > r.guided_deadline for r in self.pending)

    def remove(self, request) -> bool:
        if request in self.pending:
            self.pending.remove(request)
            return True
        return False

    def futures(self) -> list:
        """The compiles parked requests wait for (LLMEngine.wait_for_work blocks on them)."""
        return [r.guided_future for r in self.pending]

    def seconds_to_next_deadline(self) -> float | None:
        if not self.pending:
            return None
        return max(0.0, min(r.guided_deadline for r in self.pending) - time.monotonic())

    def attach(self, seq) -> None:
        seq.guided = self._state(seq.request.guided_future.result())

    # ---- triggered patterns (tool calls in auto mode) ----------------------------------------------
    def start_trigger_compile(self, request) -> None:
        """Compile the triggered pattern in the background as the request arrives: it is (almost always)
        ready by the time the output opens a call."""
        request.trigger_future = self.compiler.submit(request.params.triggered_spec.regex)

    def check_trigger(self, seq, text_before: int) -> None:
        """After a token: if the output now ends with the trigger (past `text_before`, where the text stood
        before this token), hold what follows to the pattern. A trigger followed by more than whitespace
        in the same token is left free (the pattern cannot start part-way through a token)."""
        spec = seq.params.triggered_spec
        at = seq.text.find(spec.trigger, max(0, text_before - len(spec.trigger) + 1))
        if at < 0 or seq.text[at + len(spec.trigger):].strip():
            return
        try:
            index = seq.request.trigger_future.result(timeout=self.timeout)
        except Exception:  # not compiled in time, or not at all: this call stays free (parsed or not)
            return
        seq.guided = self._state(index)
        seq.guided_triggered = True

    def _state(self, index) -> GuidedState:
        small_sets = self._small_sets.get(id(index))
        if small_sets is None or small_sets.index is not index:
            if len(self._small_sets) > 4 * self.compiler.cache_size:
                self._small_sets.clear()
            small_sets = self._small_sets[id(index)] = SmallAllowedSets(index)
        return GuidedState(small_sets, self.eos_token_id, self.compiler.token_bytes)

    def after_token(self, seq, token: int, output_processor) -> None:
        """Advance the FSM by the sampled token; append forced tokens; finish when only EOS is left (a
        triggered pattern instead lets the output go on freely)."""
        state = seq.guided
        if seq.is_finished:
            return
        if token == self.eos_token_id:  # only allowed in a final state: the match is complete
            output_processor.finish(seq, "stop", stop_reason=token)
            return
        state.advance(token)
        for forced in state.forced_tokens():
            self.num_forced_tokens += 1
            output_processor.append_token(seq, forced, {forced: 0.0} if seq.params.logprobs is not None else None)
            if seq.is_finished:
                return
        if state.only_eos_allowed():
            if seq.guided_triggered:  # the call is complete: free text again
                seq.guided, seq.guided_triggered = None, False
            else:
                output_processor.finish(seq, "stop")

    def shutdown(self) -> None:
        self.compiler.shutdown()
