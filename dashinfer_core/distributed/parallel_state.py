"""A tensor-parallel group as one process sees it: its rank, the size, and the collectives the model
calls. Each engine holds its own group object (no process-global state), so one process can run a
TP=1 engine beside a TP=2 one, or two TP groups side by side (a LiteLLM proxy with two deployments).

The groups are built straight on torch.distributed's process-group classes over a TCPStore, not on
the process-wide default group: gloo on the CPU, NCCL on CUDA for the model's data; rank 0's step
messages always go over a gloo group of their own (control), so they never queue behind NCCL work.
With one rank every collective is a no-op.
"""
from __future__ import annotations

import datetime
import pickle
import time

import torch
import torch.distributed as dist


class TPGroup:
    def __init__(self, rank: int = 0, size: int = 1, data=None, control=None, store=None):
        self.rank = rank
        self.size = size
        self._data = data  # process group for the model's collectives
        self._control = control  # gloo process group for rank 0's messages
        self._store = store
        # Time this rank spent in the model's collectives (waiting for the slowest rank included).
        self.collective_calls = 0
        self.collective_seconds = 0.0

    # ---- the model's collectives ---------------------------------------------------------------
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the ranks, in place (row-parallel outputs, the vocab-parallel embedding)."""
        if self.size > 1:
            start = time.perf_counter()
            self._data.allreduce([x]).wait()
            self.collective_calls += 1
            self.collective_seconds += time.perf_counter() - start
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        """[..., n] on each rank -> [..., n * size] in rank order (vocab-parallel logits)."""
        if self.size == 1:
            return x
        start = time.perf_counter()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        self._data.allgather([parts], [x.contiguous()]).wait()
        self.collective_calls += 1
        self.collective_seconds += time.perf_counter() - start
        return torch.cat(parts, dim=-1)

    # ---- rank 0's messages ---------------------------------------------------------------------
    def broadcast_object(self, obj=None):
        """Rank 0's `obj` on every rank (pickled: a length, then the bytes)."""
        if self.rank == 0:
            payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
            length = torch.tensor([payload.numel()], dtype=torch.int64)
        else:
            length = torch.zeros(1, dtype=torch.int64)
        self._broadcast(length)
        if self.rank != 0:
            payload = torch.empty(int(length.item()), dtype=torch.uint8)
        self._broadcast(payload)
        return obj if self.rank == 0 else pickle.loads(payload.numpy().tobytes())

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        if self.size == 1:
            return value
        t = torch.tensor([value], dtype=torch.int64)
        opts = dist.AllreduceOptions()
        opts.reduceOp = dist.ReduceOp.MIN
        self._control.allreduce([t], opts).wait()
        return int(t.item())

    def _broadcast(self, t: torch.Tensor) -> None:
        opts = dist.BroadcastOptions()
        opts.rootRank = 0
        self._control.broadcast([t], opts).wait()

    # ---- what this rank holds ------------------------------------------------------------------
    def shard(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's equal part of `total` (divisibility is checked before the
        ranks start)."""
        length = total // self.size
        return self.rank * length, length

    def kv_head_shard(self, num_kv_heads: int) -> tuple[int, int]:
        """(first KV head, count). With at least as many KV heads as ranks, each rank takes whole KV
        heads, as evenly as they go (SmolLM2's 3 over 2 ranks: 2 and 1); with fewer, each head is
        replicated on size // num_kv_heads consecutive ranks."""
        if num_kv_heads >= self.size:
            base, extra = divmod(num_kv_heads, self.size)
            return self.rank * base + min(self.rank, extra), base + (self.rank < extra)
        return self.rank // (self.size // num_kv_heads), 1

    def q_head_shard(self, num_heads: int, num_kv_heads: int) -> tuple[int, int]:
        """(first query head, count): the query heads of this rank's KV heads (a GQA group stays on
        one rank), or its equal part of one replicated KV head's group."""
        group = num_heads // num_kv_heads
        if num_kv_heads >= self.size:
            first_kv, count_kv = self.kv_head_shard(num_kv_heads)
            return first_kv * group, count_kv * group
        per_rank = group // (self.size // num_kv_heads)
        return self.rank * per_rank, per_rank

    def close(self) -> None:
        """Drop the process groups now (not at interpreter exit, where their threads can abort it)."""
        self._data = self._control = self._store = None


SINGLE = TPGroup()  # one rank: every collective a no-op


def join_group(rank: int, size: int, backend: str, host: str, port: int, timeout_s: float) -> TPGroup:
    """Meet the other ranks at host:port (rank 0 hosts the store) and build the group's process groups."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, size, is_master=(rank == 0), timeout=timeout)
    control = dist.ProcessGroupGloo(dist.PrefixStore("control", store), rank, size, timeout)
    if backend == "nccl":
        options = dist.ProcessGroupNCCL.Options()
        options._timeout = timeout
        data = dist.ProcessGroupNCCL(dist.PrefixStore("data", store), rank, size, options)
    else:
        data = dist.ProcessGroupGloo(dist.PrefixStore("data", store), rank, size, timeout)
    return TPGroup(rank, size, data, control, store)
