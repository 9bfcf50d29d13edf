"""Prefix cache: time to first token of one long prompt at cache hit rates 0/30/60/90/99 %
(DashInfer's setup: ~4,000-token prompt, 1 output token), then 8 concurrent requests sharing a
system prompt of that share of their length. Median over several runs; ratio to the 0 % row; PNG.

    python benchmarks/prefix_cache.py [--prompt-len 4000] [--runs 3] [--device cpu|cuda]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RATES = (0.0, 0.3, 0.6, 0.9, 0.99)


def ttft_single(llm, prompt, cached_len, salt_rng):
    """TTFT of `prompt` after a warm-up request has cached its first `cached_len` tokens."""
    from dashinfer_core import SamplingParams
    llm.reset_prefix_cache()
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    if cached_len:
        # Same prefix, different continuation: only the prefix can hit.
        llm.generate(prompt[:cached_len] + [salt_rng.randrange(100, 40000) for _ in range(8)], one)
    start = time.perf_counter()
    out = llm.generate(prompt, one)[0]
    return time.perf_counter() - start, out.num_cached_tokens


def ttft_concurrent(llm, system, suffixes):
    """Median TTFT of len(suffixes) requests sent together, all starting with a cached `system`."""
    from dashinfer_core import SamplingParams
    llm.reset_prefix_cache()
    one = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)
    if system:
        llm.generate(system + [7], one)
    start = time.monotonic()
    outs = llm.generate([system + s for s in suffixes], one)
    return statistics.median(o.first_token_time - start for o in outs)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--prompt-len", type=int, default=4000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--concurrent-prompt-len", type=int, default=1000,
                   help="length of each concurrent request (smaller than --prompt-len to keep CPU runs short)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "out"))
    args = p.parse_args(argv)
    import torch
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    from dashinfer_core import LLM
    llm = LLM(args.model, device=args.device, dtype=args.dtype, max_num_batched_tokens=8192, max_num_seqs=16)
    length = min(args.prompt_len, llm.engine.max_model_len - 2)
    rng = random.Random(0)
    vocab = llm.engine.vocab_size
    prompt = [rng.randrange(100, vocab) for _ in range(length)]
    ttft_single(llm, prompt[:64], 0, rng)  # warm-up

    rows = []
    for rate in RATES:
        times, cached = [], 0
        for _ in range(args.runs):
            t, cached = ttft_single(llm, prompt, int(rate * length), rng)
            times.append(t)
        rows.append((rate, statistics.median(times), cached))
    base = rows[0][1]
    where = f"{args.device}, {llm.engine.runner.dtype}, {args.threads} threads" if args.device == "cpu" else args.device
    print(f"prefix cache TTFT, one {length}-token prompt, 1 output token, median of {args.runs} ({where})")
    print(f"{'hit rate':>9} {'cached tokens':>14} {'TTFT ms':>9} {'vs 0 %':>8}")
    for rate, t, cached in rows:
        print(f"{rate * 100:>8.0f}% {cached:>14} {t * 1e3:>9.1f} {100 * t / base:>7.1f}%")

    conc_rows = []
    n = args.concurrency
    clen = min(args.concurrent_prompt_len, length)
    for rate in RATES:
        system = prompt[:int(rate * clen)]
        times = []
        for _ in range(args.runs):
            suffixes = [[rng.randrange(100, vocab) for _ in range(max(1, clen - len(system)))] for _ in range(n)]
            times.append(ttft_concurrent(llm, system, suffixes))
        conc_rows.append((rate, statistics.median(times)))
    cbase = conc_rows[0][1]
    print(f"\n{n} concurrent {clen}-token requests sharing a system prompt of the given share (median TTFT)")
    print(f"{'shared':>9} {'TTFT ms':>9} {'vs 0 %':>8}")
    for rate, t in conc_rows:
        print(f"{rate * 100:>8.0f}% {t * 1e3:>9.1f} {100 * t / cbase:>7.1f}%")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, data, title in ((axes[0], [(r, t) for r, t, _ in rows], f"1 request, {length} tokens"),
                            (axes[1], conc_rows, f"{n} concurrent requests of {clen} tokens")):
        labels = [f"{r * 100:.0f}%" for r, _ in data]
        bars = ax.bar(labels, [t * 1e3 for _, t in data], color="#1f77b4")
        for bar, (_, t) in zip(bars, data):
            ax.annotate(f"{100 * t / data[0][1]:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom")
        ax.set_xlabel("prefix cache hit rate")
        ax.set_ylabel("TTFT (ms)")
        ax.set_title(title)
    fig.suptitle(f"dashinfer-core prefix cache ({where})")
    fig.tight_layout()
    png = out / f"prefix_cache_{args.device}.png"
    fig.savefig(png, dpi=110)
    print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
