"""Rank 0's side of a tensor-parallel group: checks the settings, starts ranks 1..N-1 (fresh
processes on this host, or none with env://, where torchrun or a cluster scheduler started them),
joins the group, sends every step's plan in one broadcast, and takes the group down.

A rank that dies ends the engine: its sockets close, rank 0's next collective fails, and the runner
raises EngineDeadError; a watchdog thread notices the exit too and stops the other ranks. Ranks
watch rank 0 the same way, so no process outlives the group.
"""
from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import torch
import torch.distributed as dist

from ..config import EngineConfig
from ..errors import EngineDeadError, InvalidParameterError
from .parallel_state import TPGroup, join_group

logger = logging.getLogger(__name__)


def parse_cpu_bind(spec: str) -> list[list[int]]:
    """'0-15|16-31' (or '0,2,4|1,3,5') -> the core list of each rank."""
    groups = []
    for part in spec.split("|"):
        cores: list[int] = []
        for item in part.split(","):
            item = item.strip()
            try:
                if "-" in item:
                    lo, hi = (int(x) for x in item.split("-"))
                    cores += range(lo, hi + 1)
                else:
                    cores.append(int(item))
            except ValueError:
                raise InvalidParameterError("cpu_threads_bind", f"expected core lists like '0-15|16-31', got {spec!r}")
        if not cores:
            raise InvalidParameterError("cpu_threads_bind", f"a rank has no cores in {spec!r}")
        groups.append(cores)
    return groups


def available_cores() -> list[int]:
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def check_tp_settings(config: EngineConfig, model_cfg, device: torch.device) -> None:
    """Refuse, naming the field, a group that cannot work, before any rank starts."""
    size = config.tensor_parallel_size
    if size == 1:
        return
    sizes = [("intermediate_size", model_cfg.intermediate_size), ("vocab_size", model_cfg.vocab_size)]
    if model_cfg.moe is not None:  # each expert's intermediate size is split like a dense MLP's
        sizes += [("moe_intermediate_size", model_cfg.moe.intermediate_size),
                  ("shared_expert_intermediate_size", model_cfg.moe.shared_expert_intermediate_size)]
    for name, value in sizes:
        if value % size:
            raise InvalidParameterError("tensor_parallel_size", f"{size} does not divide the model's {name} ({value})")
    # Attention heads go by GQA group: each rank takes whole KV heads (unevenly if need be); with fewer
    # KV heads than ranks, each is replicated and its query heads are split evenly.
    kv, heads = model_cfg.num_kv_heads, model_cfg.num_heads
    if kv < size and (size % kv or (heads // kv) % (size // kv)):
        raise InvalidParameterError("tensor_parallel_size", f"{size} ranks cannot share the model's {kv} KV heads "
                                    f"and {heads} query heads (with fewer KV heads than ranks, the size must be a "
                                    "multiple of the KV heads and split each one's query heads evenly)")
    if (model_cfg.raw.get("quantization_config") or {}).get("quant_method") == "gptq":
        raise InvalidParameterError("tensor_parallel_size", "GPTQ checkpoints run with tensor_parallel_size 1")
    if device.type == "cuda":
        if torch.cuda.device_count() < size:
            raise InvalidParameterError("tensor_parallel_size", f"{size} CUDA ranks need {size} GPUs, torch sees "
                                        f"{torch.cuda.device_count()}")
        if not dist.is_nccl_available():
            raise InvalidParameterError("tensor_parallel_size", "CUDA ranks need NCCL, which this torch lacks")
    elif config.distributed_init_method is None:  # ranks on this host's cores
        cores = available_cores()
        if size > len(cores):
            raise InvalidParameterError("tensor_parallel_size", f"{size} CPU ranks need at least {size} cores, "
                                        f"this process may use {len(cores)}")
        if config.cpu_threads_bind:
            missing = sorted(set(c for g in parse_cpu_bind(config.cpu_threads_bind) for c in g) - set(cores))
            if missing:
                raise InvalidParameterError("cpu_threads_bind", f"cores {missing} are not available here "
                                            f"(available: {cores})")


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def set_rank_threads(config: EngineConfig, rank: int) -> None:
    """This rank's CPU threads: its cpu_threads_bind cores (bound), else num_threads, else an even
    share of the cores."""
    size = config.tensor_parallel_size
    if config.cpu_threads_bind:
        cores = parse_cpu_bind(config.cpu_threads_bind)[rank]
        os.sched_setaffinity(0, cores)
        torch.set_num_threads(config.num_threads or len(cores))
    else:
        torch.set_num_threads(config.num_threads or max(1, len(available_cores()) // size))


def env_rendezvous() -> tuple[str, int]:
    """MASTER_ADDR / MASTER_PORT, as torchrun and cluster schedulers set them."""
    try:
        return os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except (KeyError, ValueError):
        raise InvalidParameterError("distributed_init_method", "env:// needs MASTER_ADDR and MASTER_PORT (and "
                                    "RANK, WORLD_SIZE) in the environment")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RankGroup:
    """Started by rank 0's ModelRunner before the model is built (the model reads its shard)."""

    def __init__(self, config: EngineConfig, device: torch.device):
        self.size = config.tensor_parallel_size
        self.failure: str | None = None
        self.on_failure = None  # called once when the group breaks (wakes an idle engine loop)
        self.closed = False
        self.processes: list[subprocess.Popen] = []
        self.group: TPGroup | None = None
        backend = backend_for(device)
        if config.distributed_init_method == "env://":
            if int(os.environ.get("RANK", "0")) != 0 or int(os.environ.get("WORLD_SIZE", str(self.size))) != self.size:
                raise InvalidParameterError("distributed_init_method", "with env://, the engine runs on RANK 0 of a "
                                            f"WORLD_SIZE {self.size} group (got RANK={os.environ.get('RANK')}, "
                                            f"WORLD_SIZE={os.environ.get('WORLD_SIZE')})")
            host, port = env_rendezvous()
        else:
            host, port = "127.0.0.1", _free_port()
            # A fresh interpreter per rank, as multiprocessing's spawn makes, but started as
            # `python -m ...rank_worker`: spawn would re-run the caller's main module in every rank
            # (a script without an `if __name__ == "__main__"` guard would start engines recursively).
            config_json = json.dumps(dataclasses.asdict(config))
            for rank in range(1, self.size):
                cmd = [sys.executable, "-m", "dashinfer_core.distributed.rank_worker", "--spawned-rank", str(rank),
                       "--master", f"{host}:{port}", "--parent-pid", str(os.getpid()), "--config-json", config_json]
                self.processes.append(subprocess.Popen(cmd))
        atexit.register(self.shutdown)
        started = time.monotonic()
        try:
            self.group = join_group(0, self.size, backend, host, port, config.distributed_timeout)
        except Exception:
            self.shutdown()
            raise
        logger.info("tensor-parallel group of %d ranks (%s) formed in %.1f s", self.size, backend,
                    time.monotonic() - started)
        self._watchdog = threading.Thread(target=self._watch, name="dashinfer-rank-watchdog", daemon=True)
        self._watchdog.start()

    def send(self, plan) -> None:
        """One broadcast carries the step to every rank (None: leave the loop)."""
        if self.failure is not None:
            raise EngineDeadError(f"tensor-parallel group broken: {self.failure}")
        try:
            self.group.broadcast_object(plan)
        except Exception as exc:
            self._fail(self._exited_rank(wait=1.0) or f"broadcast failed: {exc}")
            raise EngineDeadError(f"tensor-parallel group broken: {self.failure}") from exc

    def collective_failed(self, exc: Exception) -> EngineDeadError:
        """A collective inside the forward raised: the group is broken for good."""
        self._fail(self._exited_rank(wait=1.0) or f"collective failed: {exc}")
        return EngineDeadError(f"tensor-parallel group broken: {self.failure}")

    def _exited_rank(self, wait: float) -> str | None:
        """Which rank process exited, if one did (a closed socket is usually seen before the exit)."""
        deadline = time.monotonic() + wait
        while True:
            for rank, proc in enumerate(self.processes, start=1):
                if proc.poll() is not None:
                    return f"rank {rank} exited with code {proc.returncode}"
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.05)

    def _watch(self) -> None:
        while not self.closed:
            for rank, proc in enumerate(self.processes, start=1):
                if proc.poll() is not None and not self.closed:
                    self._fail(f"rank {rank} exited with code {proc.returncode}")
                    return
            time.sleep(0.2)

    def _fail(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
            logger.error("tensor-parallel group broken: %s; stopping the other ranks", why)
            if self.on_failure is not None:
                self.on_failure()
        for proc in self.processes:
            if proc.poll() is None:
                proc.kill()

    def shutdown(self, timeout: float = 10.0) -> None:
        if self.closed:
            return
        if self.failure is None and self.group is not None:
            try:
                self.group.broadcast_object(None)
            except Exception:
                pass
        self.closed = True
        deadline = time.monotonic() + timeout
        for proc in self.processes:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        if self.group is not None:
            self.group.close()
