"""LoRAManager (the engine's side, rank 0): which adapters the engine knows, their host copies (an LRU
pool of max_cpu_loras), loads from disk on a background thread (a request waits parked, off the step
loop, until its adapter is read), and which adapter sits in which of the max_loras device slots.

The scheduler asks `can_acquire` before admitting a waiting sequence and calls `acquire`/`release`
as sequences start and stop running; a slot whose sequences all stopped keeps its adapter (a later
request of it needs no copy) until the least recently used idle slot is taken for another adapter.
The copy into a slot travels in the next step plan (`take_loads`), so every tensor-parallel rank
fills its shard of the slot before that step's forward.
"""
from __future__ import annotations

import itertools
import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from ..errors import InvalidParameterError
from ..models.model_config import ModelConfig
from .adapter import LoRAAdapter, load_adapter
from .request import LoRARequest

logger = logging.getLogger(__name__)


class LoRAManager:
    def __init__(self, cfg: ModelConfig, max_loras: int, max_lora_rank: int, max_cpu_loras: int):
        self.cfg = cfg
        self.max_lora_rank = max_lora_rank
        self.max_cpu_loras = max_cpu_loras
        self.known: dict[int, LoRARequest] = {}  # lora_int_id -> its request (registered by add or first use)
        self.uids: dict[int, int] = {}  # lora_int_id -> the uid of its current registration
        self._next_uid = itertools.count(1)
        self.pool: OrderedDict[int, LoRAAdapter] = OrderedDict()  # host copies, least recently used first
        self.loading: dict[int, Future] = {}
        self.parked: list = []  # requests waiting for their adapter's load
        self.on_ready = None  # called (from the load thread) when a load ends: wakes the loop
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-load")
        # Device slots: the uid each holds (None: empty), its running sequences, its last use.
        self.slot_uid: list[int | None] = [None] * max_loras
        self.slot_refs = [0] * max_loras
        self.slot_used = [0] * max_loras
        self._clock = itertools.count(1)
        self.pending_loads: list[tuple[int, int, LoRAAdapter]] = []  # (slot, uid, adapter) for the next plan
        self.num_slot_loads = 0
        self.num_disk_loads = 0

    # ---- registry ------------------------------------------------------------------------------
    def check(self, lora: LoRARequest) -> None:
        """A request's LoRARequest must agree with what the engine knows under its id and name."""
        if not isinstance(lora, LoRARequest):
            raise InvalidParameterError("lora_request", f"must be a LoRARequest, got {type(lora).__name__}")
        known = self.known.get(lora.lora_int_id)
        loading = self.loading.get(lora.lora_int_id)
        if known is None and loading is not None:
            known = loading.lora
        if known is not None and (known.lora_name, known.lora_path) != (lora.lora_name, lora.lora_path):
            raise InvalidParameterError("lora_request", f"lora_int_id {lora.lora_int_id} is already adapter "
                                        f"{known.lora_name!r} at {known.lora_path}")
        for other in self.known.values():
            if other.lora_name == lora.lora_name and other.lora_int_id != lora.lora_int_id:
                raise InvalidParameterError("lora_request", f"lora_name {lora.lora_name!r} is already lora_int_id "
                                            f"{other.lora_int_id}")

    def add(self, lora: LoRARequest, adapter: LoRAAdapter | None = None) -> bool:
        """Register an adapter with its host weights (read now unless `adapter` is given); raises
        InvalidParameterError for a bad adapter, which then stays unknown."""
        self.check(lora)
        if lora.lora_int_id in self.pool:
            self.pool.move_to_end(lora.lora_int_id)
            return True
        self._keep(lora, adapter or load_adapter(lora, self.cfg, self.max_lora_rank))
        return True

    def remove(self, lora_int_id: int) -> bool:
        if lora_int_id not in self.known:
            return False
        uid = self.uids[lora_int_id]
        if any(self.slot_refs[s] and self.slot_uid[s] == uid for s in range(len(self.slot_uid))):
            raise InvalidParameterError("lora_int_id", f"adapter {lora_int_id} is in use by running requests")
        del self.known[lora_int_id], self.uids[lora_int_id]
        self.pool.pop(lora_int_id, None)
        self.slot_uid = [None if u == uid else u for u in self.slot_uid]
        return True

    def list(self) -> set[int]:
        return set(self.known)

    def _keep(self, lora: LoRARequest, adapter: LoRAAdapter) -> None:
        """A freshly read adapter joins the host pool."""
        self.num_disk_loads += 1
        if lora.lora_int_id not in self.known:
            self.known[lora.lora_int_id] = lora
            self.uids[lora.lora_int_id] = next(self._next_uid)
        self.pool[lora.lora_int_id] = adapter
        self.pool.move_to_end(lora.lora_int_id)
        while len(self.pool) > self.max_cpu_loras:  # requests holding a dropped copy keep their reference
            self.pool.popitem(last=False)

    def uid_of(self, lora: LoRARequest) -> int | None:
        return self.uids.get(lora.lora_int_id)

    # ---- requests waiting for a load -------------------------------------------------------------
    def prepare(self, request) -> bool:
        """True: the request's adapter is in host memory (attached to it) and it may queue now;
        False: a load started and the request is parked until `poll` hands it back."""
        lora = request.lora
        self.check(lora)
        adapter = self.pool.get(lora.lora_int_id)
        if adapter is not None:
            self.pool.move_to_end(lora.lora_int_id)
            request.lora_adapter = adapter
            return True
        future = self.loading.get(lora.lora_int_id)
        if future is None:
            future = self.loading[lora.lora_int_id] = self._executor.submit(
                load_adapter, lora, self.cfg, self.max_lora_rank)
            future.lora = lora  # what check() compares later requests with while it loads
            if self.on_ready is not None:
                future.add_done_callback(lambda _: self.on_ready())
        self.parked.append(request)
        return False

    def poll(self):
        """Parked requests whose adapter loaded, and (request, error message) for failed loads."""
        done = {lora_id: f for lora_id, f in self.loading.items() if f.done()}
        if not done:
            return [], []
        for lora_id, future in done.items():
            del self.loading[lora_id]
            if future.exception() is None:
                self._keep(future.result().request, future.result())
        ready, failed, still = [], [], []
        for request in self.parked:
            future = done.get(request.lora.lora_int_id)
            if future is None:
                still.append(request)
            elif future.exception() is not None:
                failed.append((request, str(future.exception())))
            else:
                request.lora_adapter = future.result()
                ready.append(request)
        self.parked = still
        return ready, failed

    def has_news(self) -> bool:
        return any(f.done() for f in self.loading.values())

    def futures(self) -> list[Future]:
        return list(self.loading.values())

    def remove_parked(self, request) -> bool:
        if request in self.parked:
            self.parked.remove(request)
            return True
        return False

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ---- device slots --------------------------------------------------------------------------
    def _resident_slot(self, uid: int) -> int | None:
        return next((s for s, u in enumerate(self.slot_uid) if u == uid), None)

    def can_acquire(self, request) -> bool:
        uid = self.uid_of(request.lora)
        return self._resident_slot(uid) is not None or 0 in self.slot_refs

    def acquire(self, seq) -> None:
        """seq starts running: its adapter's slot (loading it into the least recently used idle slot
        if it is not resident) goes into seq.lora_slot."""
        request = seq.request
        uid = self.uid_of(request.lora)
        slot = self._resident_slot(uid)
        if slot is None:
            idle = [s for s in range(len(self.slot_uid)) if self.slot_refs[s] == 0]
            if not idle:
                raise RuntimeError("no idle LoRA slot (the scheduler checks can_acquire first)")
            slot = min(idle, key=lambda s: (self.slot_uid[s] is not None, self.slot_used[s]))
            self.slot_uid[slot] = uid
            self.pending_loads.append((slot, uid, request.lora_adapter))
            self.num_slot_loads += 1
        self.slot_refs[slot] += 1
        self.slot_used[slot] = next(self._clock)
        seq.lora_slot = slot

    def release(self, seq) -> None:
        if seq.lora_slot >= 0:
            self.slot_refs[seq.lora_slot] -= 1
            seq.lora_slot = -1

    def take_loads(self) -> list[tuple[int, int, LoRAAdapter]]:
        loads, self.pending_loads = self.pending_loads, []
        return loads
