"""Which path each (ISA, dtype, quantization) takes on this machine, how fast it decodes and whether the
embedded model still answers right. Each row runs in its own process, with the ISA lowered through
oneDNN's and ATen's own variables, so one AVX-512 machine also shows what an AVX2 machine runs.

    python benchmarks/capability_table.py [--threads 2] [--isa native avx2] [--tokens 32]

Prints a markdown table: forced ISA, dtype, quantization, the fast paths that are on, single-stream and
batch-16 decode tokens/s (greedy, EOS ignored), and whether the answers were right.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SETTINGS = [("float32", None), ("bfloat16", None), ("float32", "iq-int8"), ("bfloat16", "iq-int8"),
            ("float32", "iq-int4")]
ISA_ENV = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}
QUESTIONS = [("How many days are in a week?", "7"), ("What is 2 plus 2?", "4"),
             ("What is the capital of France?", "Paris")]


def one_row(dtype: str, quantization: str | None, threads: int, tokens: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    from dashinfer_core import LLM, SamplingParams
    llm = LLM(device="cpu", dtype=dtype, quantization=quantization, kv_cache_memory=256 << 20)
    outs = llm.chat([[{"role": "user", "content": q}] for q, _ in QUESTIONS], SamplingParams(max_tokens=24, temperature=0.0))
    right = sum(a in o.text for (_, a), o in zip(QUESTIONS, outs))
    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    prompts = [[100 + 7 * i + j for j in range(32)] for i in range(16)]
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # compile and warm up
    rates = {}
    for batch in (1, 16):
        start = time.perf_counter()
        outs_b = llm.generate(prompts[:batch], params)
        rates[batch] = sum(len(o.token_ids) for o in outs_b) / (time.perf_counter() - start)
    paths = llm.engine.stats().fast_paths
    return {"on": [name for name, why in paths.items() if why.startswith("on")], "single": rates[1],
            "batch16": rates[16], "right": f"{right}/{len(QUESTIONS)}", "errors": [o.error for o in outs if o.error]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--isa", nargs="+", default=["native", "avx2"], choices=list(ISA_ENV))
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--row", default=None, help=argparse.SUPPRESS)  # internal: one row in this process
    args = p.parse_args(argv)
    if args.row:
        dtype, quant = json.loads(args.row)
        print("ROW " + json.dumps(one_row(dtype, quant, args.threads, args.tokens)), flush=True)
        return 0
    print(f"threads {args.threads}, {args.tokens} tokens per sequence\n")
    print("| ISA forced | dtype | quantization | fast paths on | single stream tok/s | batch 16 tok/s | answers |")
    print("|---|---|---|---|---|---|---|")
    for isa in args.isa:
        for dtype, quant in SETTINGS:
            env = {**os.environ, **ISA_ENV[isa]}
            proc = subprocess.run([sys.executable, __file__, "--threads", str(args.threads), "--tokens",
                                   str(args.tokens), "--row", json.dumps([dtype, quant])],
                                  env=env, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ROW ")), None)
            if line is None:
                print(f"| {isa} | {dtype} | {quant or '-'} | FAILED: {proc.stderr.strip().splitlines()[-1:]} | | | |")
                continue
            r = json.loads(line[4:])
            print(f"| {isa} | {dtype} | {quant or '-'} | {', '.join(r['on']) or 'none'} | {r['single']:.1f} | "
                  f"{r['batch16']:.1f} | {r['right']}{' errors: ' + str(r['errors']) if r['errors'] else ''} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
