"""Prefix cache tiers: time to first token of one ~4,000-token prompt (1 output token, greedy) on the embedded
model, in one run:

  miss            nothing cached
  device hit      the same prompt again
  CPU-tier hit    after another long prompt pushed its blocks from the device to the CPU tier
  disk hit        after restarting the engine (a new LLM on the same disk_cache_dir, nothing in memory);
                  the files are in the OS page cache then, as on a replica that just wrote or read them
  disk hit, cold  the same after dropping the page cache, where this machine allows it (root, not a container)

Median of --runs; the ratio to the miss; the outputs of every row are checked to be the same token.

    python benchmarks/disk_cache.py [--prompt-len 4000] [--runs 3] [--threads 2] [--dir DIR]
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=4000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--dir", default=None, help="disk_cache_dir (default: a new temporary directory)")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE.parent))
    from dashinfer_core import LLM, SamplingParams
    from dashinfer_core.cache.kv_cache import bytes_per_block

    directory = Path(args.dir or tempfile.mkdtemp(prefix="dashinfer-disk-bench-"))
    rng = random.Random(0)
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)

    def new_prompt():
        return [rng.randrange(100, 40000) for _ in range(args.prompt_len)]

    def make(block_bytes=None):
        # Device KV for ~1.2 prompts, a CPU tier for ~1.2: a second prompt pushes the first to the CPU tier.
        blocks = -(-args.prompt_len // 32) * 6 // 5
        kw = {} if block_bytes is None else dict(kv_cache_memory=blocks * block_bytes,
                                                 cpu_cache_memory=blocks * block_bytes)
        return LLM(dtype=args.dtype, num_threads=args.threads, disk_cache_dir=str(directory),
                   max_model_len=args.prompt_len + 64, **kw)

    probe = make()
    cfg, runner = probe.engine.runner.model_cfg, probe.engine.runner
    block_bytes = bytes_per_block(cfg.num_layers, 32, cfg.num_kv_heads, cfg.head_dim, runner.dtype)
    probe.shutdown()
    del probe
    shutil.rmtree(directory, ignore_errors=True)

    def timed(llm, prompt):
        start = time.perf_counter()
        out = llm.generate(prompt, one)[0]
        return time.perf_counter() - start, out

    rows: dict[str, list[float]] = {}
    tokens: dict[str, set] = {}
    extra: dict[str, list] = {}

    def record(name, seconds, out, note=""):
        rows.setdefault(name, []).append(seconds)
        tokens.setdefault(name, set()).add(tuple(out.outputs[0].token_ids))
        extra.setdefault(name, []).append((out.num_cached_tokens, out.num_cpu_cached_tokens,
                                           out.num_disk_cached_tokens))

    cold_ok = None
    prompt = None
    llm = make(block_bytes)
    llm.generate([rng.randrange(100, 40000) for _ in range(64)], one)  # warm-up
    for _ in range(args.runs):
        prompt = new_prompt()  # a new prompt each run: the miss is a miss
        record("miss", *timed(llm, prompt))
        record("device hit", *timed(llm, prompt))
        llm.generate(new_prompt(), one)  # pushes `prompt` to the CPU tier
        record("CPU-tier hit", *timed(llm, prompt))
        llm.shutdown()  # flushes the queued writes
        del llm
        llm = make(block_bytes)
        llm.generate([rng.randrange(100, 40000) for _ in range(64)], one)  # warm-up of the new engine
        record("disk hit (after restart)", *timed(llm, prompt))
        if cold_ok is not False:
            llm.shutdown()
            del llm
            llm = make(block_bytes)
            llm.generate([rng.randrange(100, 40000) for _ in range(64)], one)
            cold_ok = drop_page_cache()
            if cold_ok:
                record("disk hit, cold page cache", *timed(llm, prompt))
    stats = llm.engine.stats()
    llm.shutdown()
    files = list(directory.glob("*.kvb"))
    size = sum(f.stat().st_size for f in files)
    miss = statistics.median(rows["miss"])
    print(f"\n{args.prompt_len}-token prompt, 1 output token, dtype {args.dtype} ({runner.dtype}), "
          f"{args.threads} threads, median of {args.runs}; directory {directory}: {len(files)} files, "
          f"{size / 2**20:.0f} MiB")
    print("| case | TTFT s | of the miss | cached tokens (all / CPU tier / disk) | same token |")
    print("|---|---|---|---|---|")
    first = tokens["miss"]
    results = {}
    for name, values in rows.items():
        med = statistics.median(values)
        cached = extra[name][-1]
        same = tokens[name] == first if name != "miss" else True
        print(f"| {name} | {med:.3f} | {100 * med / miss:.1f} % | {cached[0]} / {cached[1]} / {cached[2]} | {same} |")
        results[name] = {"ttft_s": med, "ratio": med / miss, "runs": values}
    if cold_ok is False:
        print("(the page cache could not be dropped here: no cold-disk row)")
    print(f"last engine: disk reads {stats.disk_reads}, corrupted {stats.disk_corrupted}, "
          f"hit tokens {stats.disk_hit_tokens}")
    out_dir = HERE / "out"
    out_dir.mkdir(exist_ok=True)
    (out_dir / "disk_cache.json").write_text(json.dumps(results, indent=1))
    if args.dir is None:
        shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
