"""Tensor parallel on this machine: the embedded model with TP=1 and TP=2, same cores in total.

    python benchmarks/tensor_parallel.py [--threads 2] [--num-prompts 16] [--output-len 64]

TP=1 runs `threads` torch threads; TP=2 runs threads / 2 per rank. Reports start-up time (engine built,
ranks joined, weights loaded), batch and single-stream decode throughput (greedy, EOS ignored), and rank
0's time in the all-reduces / all-gathers per step (waiting for the other rank included). Each setting
runs in its own process.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def one(tp: int, threads: int, num_prompts: int, output_len: int) -> dict:
    import torch
    from dashinfer_core import LLM, SamplingParams
    start = time.perf_counter()
    llm = LLM(device="cpu", dtype="float32", tensor_parallel_size=tp, num_threads=threads // tp if tp > 1 else threads)
    if tp == 1:
        torch.set_num_threads(threads)
    startup = time.perf_counter() - start
    tp_group = llm.engine.runner.tp

    def collective_stats():
        return tp_group.collective_calls, tp_group.collective_seconds
    prompts = [[100 + 13 * i + j for j in range(64)] for i in range(num_prompts)]
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    result = {"tp": tp, "startup_s": startup}
    for name, batch in (("batch", prompts), ("single", prompts[:1])):
        steps0, (calls0, secs0) = llm.engine.num_steps, collective_stats()
        t0 = time.perf_counter()
        outs = llm.generate(batch, params)
        elapsed = time.perf_counter() - t0
        steps, (calls, secs) = llm.engine.num_steps - steps0, collective_stats()
        result[f"{name}_tok_s"] = sum(len(o.outputs[0].token_ids) for o in outs) / elapsed
        result[f"{name}_step_ms"] = 1000 * elapsed / steps
        result[f"{name}_collective_ms_per_step"] = 1000 * (secs - secs0) / steps
        result[f"{name}_collectives_per_step"] = (calls - calls0) / steps
    llm.shutdown()
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is not None:
        print("RESULT " + json.dumps(one(args.one, args.threads, args.num_prompts, args.output_len)))
        return 0
    rows = []
    for tp in (1, 2):
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads if tp == 1 else args.threads // 2))
        proc = subprocess.run([sys.executable, __file__, "--one", str(tp), "--threads", str(args.threads),
                               "--num-prompts", str(args.num_prompts), "--output-len", str(args.output_len)],
                              capture_output=True, text=True, env=env)
        line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(line[7:]))
    print(f"embedded SmolLM2-135M, float32, {args.threads} cores in total, {args.num_prompts} prompts x 64 tokens "
          f"in, {args.output_len} out\n")
    print("| TP | start-up s | batch tok/s | batch step ms | all-reduce ms/step | single tok/s | single step ms "
          "| all-reduce ms/step (single) | collectives/step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['tp']} | {r['startup_s']:.1f} | {r['batch_tok_s']:.1f} | {r['batch_step_ms']:.1f} | "
              f"{r['batch_collective_ms_per_step']:.2f} | {r['single_tok_s']:.1f} | {r['single_step_ms']:.1f} | "
              f"{r['single_collective_ms_per_step']:.2f} | {r['single_collectives_per_step']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
