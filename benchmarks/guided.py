"""Guided decoding costs: batch throughput with 0 / 50 / 100 % guided requests, one JSON request
against a free-text request forced to the same output length, and compile / cached-lookup times.

    python benchmarks/guided.py [--batch 32] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

# A schema whose answers run long enough to measure: a list of records.
LIST_SCHEMA = {"type": "object", "properties": {"people": {"type": "array", "minItems": 4, "maxItems": 4, "items": {
    "type": "object", "properties": {"name": {"type": "string", "minLength": 3, "maxLength": 12},
                                     "age": {"type": "integer", "minimum": 1, "maximum": 99},
                                     "city": {"type": "string", "minLength": 3, "maxLength": 12}},
    "required": ["name", "age", "city"]}}}, "required": ["people"]}


def throughput(llm, prompt, lengths, guided_share, max_tokens):
    """Request i is guided (JSON) or free text of the same length `lengths[i]` (the length its JSON
    answer has), so every mix does the same amount of work."""
    from dashinfer_core import SamplingParams
    batch = len(lengths)
    n_guided = int(batch * guided_share)
    params = [SamplingParams(max_tokens=max_tokens, temperature=0.8, seed=i, json_schema=LIST_SCHEMA)
              for i in range(n_guided)]
    params += [SamplingParams(max_tokens=lengths[i], temperature=0.8, seed=i, ignore_eos=True)
               for i in range(n_guided, batch)]
    start = time.perf_counter()
    outs = llm.generate([prompt] * batch, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    return tokens / elapsed, tokens, elapsed


def json_vs_free_latency(llm, prompt, runs):
    from dashinfer_core import SamplingParams
    json_times, free_times, lengths = [], [], []
    for i in range(runs):
        start = time.perf_counter()
        out = llm.generate(prompt, SamplingParams(max_tokens=200, temperature=0.0, json_schema=LIST_SCHEMA))[0]
        json_times.append(time.perf_counter() - start)
        lengths.append(len(out.token_ids))
        start = time.perf_counter()
        llm.generate(prompt, SamplingParams(max_tokens=len(out.token_ids), temperature=0.0, ignore_eos=True))
        free_times.append(time.perf_counter() - start)
    return statistics.median(json_times), statistics.median(free_times), lengths[0]


def compile_times(llm):
    from test_guided import SCHEMAS

    from dashinfer_core import SamplingParams
    from dashinfer_core.guided.compiler import GuidedCompiler
    engine = llm.engine
    compiler = GuidedCompiler(engine.tokenizer, engine.vocab_size, engine.eos_token_ids[0])
    t0 = time.perf_counter()
    compiler.vocabulary()
    vocab_s = time.perf_counter() - t0
    first, cached = [], []
    for schema in SCHEMAS + [LIST_SCHEMA]:
        regex = SamplingParams(json_schema=schema).guided_spec.regex
        t0 = time.perf_counter()
        compiler.submit(regex).result()
        first.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        compiler.submit(regex).result()
        cached.append(time.perf_counter() - t0)
    compiler.shutdown()
    return vocab_s, first, cached


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "out"))
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from dashinfer_core import LLM, SamplingParams
    from dashinfer_core.llm import apply_chat_template
    llm = LLM(device=args.device, max_num_seqs=max(64, args.batch))
    prompt = apply_chat_template(llm.get_tokenizer(), [{"role": "user", "content":
                                 "List four people as JSON with their name, age and city."}])
    llm.generate(prompt, SamplingParams(max_tokens=8, json_schema=LIST_SCHEMA))  # warm-up and compile

    json_outs = llm.generate([prompt] * args.batch, [SamplingParams(max_tokens=args.max_tokens, temperature=0.8, seed=i,
                                                                    json_schema=LIST_SCHEMA)
                                                     for i in range(args.batch)])
    lengths = [len(o.token_ids) for o in json_outs]
    shares = (0.0, 0.5, 1.0)
    results = {share: [] for share in shares}
    for _ in range(args.runs):  # interleaved, so drift in machine speed hits every mix alike
        for share in shares:
            results[share].append(throughput(llm, prompt, lengths, share, args.max_tokens))
    rows = [(share, statistics.median(r[0] for r in results[share]), results[share][0][1]) for share in shares]
    base = rows[0][1]
    print(f"batch of {args.batch} requests, JSON answers of {min(lengths)}-{max(lengths)} tokens and free text of "
          f"the same lengths, temperature 0.8, median of {args.runs} ({args.device}, {args.threads} threads)")
    print(f"{'guided':>7} {'tokens/s':>9} {'tokens':>7} {'vs 0 %':>7}")
    for share, tps, tokens in rows:
        print(f"{share * 100:>6.0f}% {tps:>9.1f} {tokens:>7} {tps / base:>7.2f}")

    json_s, free_s, length = json_vs_free_latency(llm, prompt, args.runs)
    forced = llm.engine.guided.num_forced_tokens
    print(f"\none JSON request ({length} tokens, greedy) {json_s * 1e3:.0f} ms vs free text forced to the same "
          f"length {free_s * 1e3:.0f} ms: ratio {json_s / free_s:.2f} (jump-forward tokens so far: {forced})")

    vocab_s, first, cached = compile_times(llm)
    print(f"\nvocabulary build {vocab_s * 1e3:.0f} ms (once per engine); {len(first)} schemas: first compile "
          f"median {statistics.median(first) * 1e3:.1f} ms, max {max(first) * 1e3:.1f} ms; cached lookup median "
          f"{statistics.median(cached) * 1e6:.1f} us")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    bars = ax.bar([f"{s * 100:.0f}% guided" for s, _, _ in rows], [t for _, t, _ in rows], color="#1f77b4")
    for bar, (_, t, _) in zip(bars, rows):
        ax.annotate(f"{t / base:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center",
                    va="bottom")
    ax.set_ylabel("output tokens/s")
    ax.set_title(f"guided decoding, batch {args.batch} ({args.device})")
    fig.tight_layout()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"guided_{args.device}.png", dpi=110)
    print(f"\nwrote {out / f'guided_{args.device}.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
