"""What ranks 1..N-1 run: join the group, build their shard of the model and KV cache (the same
ModelRunner as rank 0), then forward every step plan rank 0 broadcasts until it sends None.

Started by rank 0 (launcher.RankGroup, spawn) or, with env://, by torchrun or a cluster scheduler:

    RANK=1 WORLD_SIZE=2 MASTER_ADDR=host0 MASTER_PORT=29500 \\
        python -m dashinfer_core.distributed.rank_worker --model DIR --tensor-parallel-size 2 \\
        --distributed-init-method env:// [the engine flags rank 0 was given]
"""
from __future__ import annotations

import os
import sys
import threading
import time

from ..config import EngineConfig


def _exit_when_parent_dies(parent_pid: int) -> None:
    def watch():
        while True:
            if os.getppid() != parent_pid:
                os._exit(3)  # rank 0 is gone: nothing will ever be sent
            time.sleep(0.5)
    threading.Thread(target=watch, name="dashinfer-parent-watch", daemon=True).start()


def run_rank(rank: int, config: EngineConfig, host: str, port: int) -> None:
    from ..engine.runner import ModelRunner, resolve_device
    from .launcher import backend_for, set_rank_threads
    from .parallel_state import join_group
    device = resolve_device(config.device, rank)
    if device.type == "cpu":
        set_rank_threads(config, rank)
    group = join_group(rank, config.tensor_parallel_size, backend_for(device), host, port, config.distributed_timeout)
    runner = ModelRunner(config, rank=rank, group=group)
    from ..cache.disk_tier import DiskMessage
    while True:
        plan = group.broadcast_object()
        if plan is None:
            break
        if isinstance(plan, DiskMessage):  # the prefix cache's disk tier: this rank's shard of the blocks
            runner.disk_io.handle(plan)
            continue
        runner.run_plan(plan)
    if runner.disk_io is not None:
        runner.disk_io.shutdown()  # its queued writes reach the disk before the rank exits


def main(argv=None) -> int:
    """A rank started by rank 0 (--spawned-rank, the config as JSON), or by torchrun / a cluster
    scheduler (env://, the engine flags as rank 0 got them)."""
    import argparse
    import json

    from ..engine_args import add_engine_args, engine_config_from_args
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spawned-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--master", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--config-json", default=None, help=argparse.SUPPRESS)
    add_engine_args(parser)
    args = parser.parse_args(argv)
    import faulthandler
    import signal
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 <rank pid>` prints where a stuck rank is
    if args.spawned_rank is not None:
        _exit_when_parent_dies(args.parent_pid)
        rank = args.spawned_rank
        host, port = args.master.rsplit(":", 1)
        config = EngineConfig(**json.loads(args.config_json))
    else:
        from .launcher import env_rendezvous
        rank, (host, port) = int(os.environ["RANK"]), env_rendezvous()
        if rank == 0:
            raise SystemExit("RANK 0 runs the engine itself (LLM, the CLI or a server), not rank_worker")
        config = engine_config_from_args(args, distributed_init_method="env://")
    try:
        run_rank(rank, config, host, int(port))
    except BaseException as exc:  # a broken group: exit non-zero (rank 0's watchdog sees it)
        print(f"dashinfer rank {rank}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        os._exit(1)
    # Straight out: interpreter teardown with the collectives' C++ threads still around can abort.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
