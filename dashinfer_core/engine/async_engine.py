"""AsyncEngine: the step loop on its own thread, one asyncio stream per request.

Callers validate and tokenize in their own thread (bad input raises at once, before anything is
queued); adds and aborts are handed to the loop thread, which owns the LLMEngine. Each step's
outputs are pushed to the streams with `call_soon_threadsafe`. A stream closed early (client gone,
task cancelled, `break` out of `async for`) aborts its request, which frees its blocks on the next
loop turn. If the loop itself crashes, every pending stream gets EngineDeadError instead of hanging.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import uuid
from collections.abc import AsyncIterator

from ..config import EngineConfig
from ..errors import DuplicateRequestError, EngineDeadError
from ..outputs import RequestOutput
from ..sampling_params import SamplingParams
from .llm_engine import EngineStats, LLMEngine
from .openmp_pool import release_thread_pool
from .sequence import Request

logger = logging.getLogger(__name__)


class RequestFailedError(RuntimeError):
    """The engine ended this request with an error; other requests are unaffected."""

    def __init__(self, request_id: str, message: str, is_client_error: bool = False):
        self.request_id = request_id
        self.message = message
        self.is_client_error = is_client_error  # the request's own fault (4xx), not the engine's (5xx)
        super().__init__(f"request {request_id} failed: {message}")


class _Stream:
    """One request's outputs, read in order on its caller's event loop: a deque and the reader's waiter
    (asyncio.Queue's own bookkeeping, paid for every output of every step, is more than this needs)."""
    __slots__ = ("loop", "items", "waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: collections.deque = collections.deque()
        self.waiter: asyncio.Future | None = None

    def put(self, item) -> None:
        """On the stream's event loop."""
        self.items.append(item)
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():  # (done: the reader was cancelled)
            waiter.set_result(None)

    async def get(self):
        while not self.items:
            self.waiter = self.loop.create_future()
            await self.waiter
        return self.items.popleft()


class AsyncEngine:
    def __init__(self, config: EngineConfig | None = None, **engine_options):
        config = config or EngineConfig.from_kwargs(**engine_options)
        self._cond = threading.Condition()
        self._pending_adds: list[Request] = []
        self._pending_aborts: list[str] = []
        self._pending_calls: list = []  # (future, fn, args) to run on the loop thread
        self._streams: dict[str, _Stream] = {}
        self._observer = None  # set_output_observer
        self._dead: BaseException | None = None
        self._stopping = False
        # The engine is built on the loop thread, which then runs every step: torch's OpenMP thread pool
        # belongs to the thread that first runs a parallel op, and steps run from another thread than
        # the one that loaded the model were 25-70 % slower with 2 threads (a second pool competes).
        # For the same reason the caller's own idle pool, if it ran a parallel op before, goes (openmp_pool.py).
        release_thread_pool()
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(config,), name="dashinfer-step-loop", daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error
        self.tokenizer = self.engine.tokenizer

    def _run(self, config: EngineConfig) -> None:
        try:
            self.engine = LLMEngine(config)
            self.engine.set_work_callback(self._wake)
            self.engine.warm_up()  # before the constructor returns: a server registers once it is warm
        except BaseException as exc:  # raised to the constructor's caller
            self._start_error = exc
            return
        finally:
            self._started.set()
        self._loop()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    # ---- public API ----------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], sampling_params: SamplingParams | None = None,
                       request_id: str | None = None, priority: int = 0,
                       cache_salt: str | None = None, lora_request=None,
                       images: list | None = None) -> AsyncIterator[RequestOutput]:
        """Stream RequestOutputs (with delta_text / delta_token_ids) until the request finishes.
        lora_request: a LoRARequest (enable_lora); its adapter is read on a loader thread while the
        request waits, and a bad adapter fails the request (RequestFailedError, a client error)."""
        request_id = request_id or uuid.uuid4().hex
        if self._dead is not None:
            raise EngineDeadError(f"the engine's step loop has stopped: {self._dead}")
        request = self.engine.build_request(request_id, prompt, sampling_params, priority, cache_salt, lora_request,
                                            images)
        stream = self._submit(request)
        try:
            async for out in stream:
                yield out
        finally:  # the caller stopped early: the request is aborted now, not when collected
            await stream.aclose()

    async def _submit(self, request) -> AsyncIterator[RequestOutput]:
        """Queue a built request for the step loop and stream its outputs until it finishes."""
        request_id = request.request_id
        stream = _Stream(asyncio.get_running_loop())
        with self._cond:
            if request_id in self._streams:
                raise DuplicateRequestError(request_id)
            self._streams[request_id] = stream
            self._pending_adds.append(request)
            self._cond.notify()
        finished = False
        try:
            while True:
                item = await stream.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.error is not None:
                    finished = True
                    raise RequestFailedError(request_id, item.error, item.error_is_client)
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(request_id)

    async def embed(self, prompt: str | list[int], pooling=None, request_id: str | None = None,
                    lora_request=None) -> RequestOutput:
        """An embedding (pooling.PoolingParams; last-token, normalised by default), batched with the
        generation in flight: the finished RequestOutput, its vector in `embedding`."""
        from ..pooling import PoolingParams
        request_id = request_id or uuid.uuid4().hex
        if self._dead is not None:
            raise EngineDeadError(f"the engine's step loop has stopped: {self._dead}")
        request = self.engine.build_request(request_id, prompt, SamplingParams(max_tokens=1),
                                            lora_request=lora_request, pooling=pooling or PoolingParams())
        last = None
        async for out in self._submit(request):
            last = out
        return last

    # LoRA: the adapter is read here (a worker thread), registered on the loop thread (engine state).
    async def add_lora(self, lora_request) -> bool:
        manager = self.engine._lora_manager()
        from ..lora.adapter import load_adapter
        adapter = await asyncio.to_thread(load_adapter, lora_request, manager.cfg, manager.max_lora_rank)
        return await self._on_loop(manager.add, lora_request, adapter)

    async def remove_lora(self, lora_int_id: int) -> bool:
        return await self._on_loop(self.engine.remove_lora, lora_int_id)

    async def list_loras(self) -> set[int]:
        return await self._on_loop(self.engine.list_loras)

    async def _on_loop(self, fn, *args):
        """Run fn(*args) on the step-loop thread, between steps."""
        future = concurrent.futures.Future()
        with self._cond:
            self._pending_calls.append((future, fn, args))
            self._cond.notify()
        return await asyncio.wrap_future(future)

    def abort(self, request_id: str) -> None:
        with self._cond:
            self._pending_aborts.append(request_id)
            self._cond.notify()

    def get_request_status(self, request_id: str) -> str | None:
        with self._cond:
            if any(r.request_id == request_id for r in self._pending_adds):
                return "waiting"
        return self.engine.get_request_status(request_id)

    def get_stats(self) -> EngineStats:
        return self.engine.stats()

    @property
    def dead_reason(self) -> BaseException | None:
        """Why the step loop stopped, if it crashed (a tensor-parallel rank died, a broken engine)."""
        return self._dead

    def join(self, timeout: float | None = None) -> None:
        """Wait until the step loop ends (shutdown, or a crash: then dead_reason says why)."""
        self._thread.join(timeout)

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self._dead is None

    def shutdown(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join(timeout)
        self.engine.shutdown()

    # ---- the loop thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._cond:
                    # Sleep while there is nothing to run; requests waiting only for a guided
                    # compile wake the loop when it ends (or at their deadline).
                    while not (self._stopping or self._pending_adds or self._pending_aborts or self._pending_calls
                               or self.engine.has_runnable_work()):
                        self._cond.wait(self.engine.seconds_to_next_deadline())
                    if self._stopping:
                        break
                    adds, self._pending_adds = self._pending_adds, []
                    aborts, self._pending_aborts = self._pending_aborts, []
                    calls, self._pending_calls = self._pending_calls, []
                for future, fn, args in calls:
                    try:
                        future.set_result(fn(*args))
                    except Exception as exc:
                        future.set_exception(exc)
                for request in adds:
                    try:
                        self.engine.add(request)
                    except Exception as exc:
                        self._deliver_error(request.request_id, exc)
                for request_id in aborts:
                    out = self.engine.abort_request(request_id)
                    if out is not None:
                        self._deliver(out)
                self._deliver_all(self.engine.step())
        except BaseException as exc:  # the loop is dead: fail everyone rather than hang them
            logger.exception("the engine step loop crashed")
            self._dead = exc
        finally:
            reason = self._dead or RuntimeError("engine shut down")
            with self._cond:
                pending = list(self._streams)
            for request_id in pending:
                self._deliver_error(request_id, EngineDeadError(f"the engine's step loop has stopped: {reason}"))

    def set_output_observer(self, observer) -> None:
        """observer(outputs) is called on the step thread with every batch of outputs delivered (metrics)."""
        self._observer = observer

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """A step's outputs, handed to each event loop in one call: one wake-up of the loop per step, not
        one per request (at 64 streams the per-request wake-ups cost more than the step's own host work)."""
        if self._observer is not None and outputs:
            try:
                self._observer(outputs)
            except Exception:  # metrics must never stop serving
                logger.exception("the output observer failed")
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        with self._cond:
            for out in outputs:
                stream = self._streams.get(out.request_id)
                if stream is None:
                    continue
                if out.finished:
                    del self._streams[out.request_id]
                by_loop.setdefault(stream.loop, []).append((stream, out))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # the caller's event loop is gone: nobody will read the rest
                for _, out in items:
                    if not out.finished:
                        self.abort(out.request_id)

    def _deliver(self, out: RequestOutput) -> None:
        self._deliver_all([out])

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        with self._cond:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            try:
                stream.loop.call_soon_threadsafe(stream.put, exc)
            except RuntimeError:
                pass


def _put_all(items: list) -> None:
    for stream, out in items:
        stream.put(out)
