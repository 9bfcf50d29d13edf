"""Soak: thousands of randomized requests through one engine (random prompts and lengths, sampling
parameters, priorities, aborts at random steps, shared prefixes for cache hits, guided requests, a
small KV budget so preemption happens), then the ledger: every request ended exactly once, blocks
leaked, and the process memory before and after.

    python benchmarks/soak.py [--requests 20000] [--in-flight 48] [--kv-blocks 60]
    python benchmarks/soak.py --compare        # shape buckets off, then on, each in its own process

The memory goal: RSS at the end within 5 % of RSS after the first quarter of the requests.
"""
from __future__ import annotations

import argparse
import collections
import ctypes
import gc
import random
import resource
import sys
import time


def rss_mb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def random_request(rng: random.Random, i: int, prefixes, vocab: int):
    from dashinfer_core import SamplingParams
    prompt = (rng.choice(prefixes) if rng.random() < 0.4 else []) + \
        [rng.randrange(100, vocab) for _ in range(rng.randint(1, 60))]
    kind = rng.random()
    guided = {}
    if kind < 0.05:
        guided = {"choice": ["red", "green", "blue"]}
    elif kind < 0.10:
        guided = {"regex": r"[0-9]{1,4}"}
    params = SamplingParams(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 0.0, 0.7, 1.2]),
                            top_k=rng.choice([-1, -1, 20]), top_p=rng.choice([1.0, 0.9]), seed=rng.randrange(1 << 30),
                            n=rng.choice([1] * 9 + [2]), ignore_eos=rng.random() < 0.5,
                            stop=rng.choice([None, None, ["."]]), **guided)
    abort_after = rng.choice([None] * 9 + [rng.randint(0, 6)])
    return f"soak-{i}", prompt, params, rng.randint(0, 3), abort_after


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=20000)
    p.add_argument("--in-flight", type=int, default=48)
    p.add_argument("--kv-blocks", type=int, default=60, help="KV cache size in blocks (small: forces preemption)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-bucketing", action="store_true", help="EngineConfig(bucket_batch_shapes=False)")
    p.add_argument("--compare", action="store_true", help="run without and with shape buckets, one process each")
    args = p.parse_args(argv)
    if args.compare:
        return compare(argv)
    import torch
    torch.set_num_threads(args.threads)
    from dashinfer_core import EngineConfig, LLMEngine
    from dashinfer_core.cache.kv_cache import bytes_per_block

    probe = EngineConfig()
    engine = LLMEngine(EngineConfig(kv_cache_memory=args.kv_blocks * bytes_per_block(30, probe.block_size, 3, 64,
                                                                                    torch.float32),
                                    max_num_seqs=32, max_num_batched_tokens=512,
                                    bucket_batch_shapes=not args.no_bucketing))
    rng = random.Random(args.seed)
    prefixes = [[rng.randrange(100, engine.vocab_size) for _ in range(rng.randint(32, 96))] for _ in range(6)]
    engine.step()
    rss_before = rss_mb()
    start = time.monotonic()
    pending = [random_request(rng, i, prefixes, engine.vocab_size) for i in range(args.requests)]
    pending.reverse()
    live: dict[str, int | None] = {}  # request id -> steps left before abort
    ended = collections.Counter()
    reasons = collections.Counter()
    rejected = 0
    rss_warm = None  # after the first 10 %: pages the KV cache and allocators keep are resident by then
    rss_quarter = None
    generated = 0  # tokens of every ended completion
    rss_by_decile = []  # RSS each time another 10 % of the requests has ended
    while pending or engine.has_unfinished_requests():
        if rss_warm is None and len(ended) >= args.requests // 10:
            rss_warm = rss_mb()
        if rss_quarter is None and len(ended) >= args.requests // 4:
            rss_quarter = rss_mb()
        if len(ended) >= (len(rss_by_decile) + 1) * args.requests // 10:
            rss_by_decile.append(round(rss_mb()))
        while pending and len(live) < args.in_flight:
            request_id, prompt, params, priority, abort_after = pending.pop()
            try:
                engine.add_request(request_id, prompt, params, priority=priority)
                live[request_id] = abort_after
            except ValueError:
                rejected += 1
        for request_id, left in list(live.items()):
            if left == 0:
                out = engine.abort_request(request_id)
                if out is not None:
                    ended[request_id] += 1
                    generated += sum(len(c.token_ids) for c in out.outputs)
                    reasons.update(c.finish_reason for c in out.outputs)
                    del live[request_id]
            elif left is not None:
                live[request_id] = left - 1
        engine.wait_for_work(0.5)
        for out in engine.step():
            if out.finished:
                ended[out.request_id] += 1
                generated += sum(len(c.token_ids) for c in out.outputs)
                reasons.update(c.finish_reason for c in out.outputs)
                live.pop(out.request_id, None)
    elapsed = time.monotonic() - start
    stats = engine.stats()
    leaked = stats.num_blocks - stats.num_free_blocks
    twice = sum(1 for v in ended.values() if v > 1)
    print(f"soak: {args.requests} requests ({rejected} rejected at submission) in {elapsed:.0f} s, "
          f"{engine.num_steps} steps, {stats.num_preemptions} preemptions, prefix hit rate {stats.prefix_hit_rate:.2f}")
    print(f"ended exactly once: {sum(1 for v in ended.values() if v == 1)}, more than once: {twice}, "
          f"never: {args.requests - rejected - len(ended)}")
    print(f"finish reasons: {dict(reasons)}")
    print(f"KV blocks leaked: {leaked} of {stats.num_blocks}; ref counts all zero: {not any(engine.scheduler.block_manager.ref_counts)}")
    print(f"RSS before {rss_before:.0f} MB, after the first 10 % {rss_warm:.0f} MB, at the end {rss_mb():.0f} MB")
    print(f"RSS (MB) as each further 10 % of the requests ended: {rss_by_decile}")
    rss_end = rss_mb()
    print(f"RSS after the first quarter {rss_quarter:.0f} MB, at the end {rss_end:.0f} MB: "
          f"{100 * (rss_end / rss_quarter - 1):+.1f} % (goal: within 5 %)")
    print(f"throughput: {args.requests / elapsed:.2f} requests/s, {generated / elapsed:.1f} generated tokens/s")
    print(f"requests still held by the engine: {len(engine.requests)}")
    gc.collect()
    try:  # glibc keeps freed heap pages: trimming tells allocator retention apart from live objects
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        print(f"RSS after gc + malloc_trim: {rss_mb():.0f} MB")
    except OSError:
        pass
    engine.shutdown()
    return 0 if leaked == 0 and twice == 0 and len(ended) == args.requests - rejected else 1


def compare(argv) -> int:
    """Buckets off, then on, each in a fresh process (RSS is per process), same requests and seed."""
    import subprocess
    rest = [a for a in (argv if argv is not None else sys.argv[1:]) if a != "--compare"]
    codes = []
    for extra in (["--no-bucketing"], []):
        print(f"==== bucket_batch_shapes={'False' if extra else 'True'}", flush=True)
        codes.append(subprocess.call([sys.executable, __file__, *rest, *extra]))
    return max(codes)


if __name__ == "__main__":
    sys.exit(main())
