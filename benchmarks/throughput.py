"""Offline generation throughput, side by side, in one run.

N prompts (lengths drawn from a fixed seed), M new tokens each (EOS ignored), greedy, on the same
model with the same thread count, for every engine available here. Each engine runs in its own
subprocess (its own peak memory, no shared thread pools). Prints one table with the ratio of each
engine to dashinfer-core and writes a PNG bar chart.

    python benchmarks/throughput.py                       # all engines found, embedded model
    python benchmarks/throughput.py --engines dashinfer-core,hf --num-prompts 16 --output-len 32
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from harness import (ALL_ENGINES, Result, engine_available, engine_command, print_table,  # noqa: E402
                     write_bar_chart)


def make_prompts(num_prompts: int, min_len: int, max_len: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(rng.randint(min_len, max_len))]
            for _ in range(num_prompts)]


def run_engine_subprocess(name: str, spec: dict, python: str) -> Result:
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), TOKENIZERS_PARALLELISM="false")
    cmd = engine_command(name, python, spec)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=spec.get("timeout", 3600))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return Result(**json.loads(line[len("RESULT "):]))
    tail = (proc.stderr or proc.stdout)[-2000:]
    return Result(engine=name, error=f"exit {proc.returncode}: {tail}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", default="all", help="comma-separated: " + ",".join(ALL_ENGINES))
    p.add_argument("--model", default=None, help="HF directory (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--min-input-len", type=int, default=32)
    p.add_argument("--max-input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu")
    p.add_argument("--hf-batch-size", type=int, default=16, help="HF generate batch (left-padded)")
    p.add_argument("--single-stream", action="store_true", help="one prompt at a time (every engine)")
    p.add_argument("--quantization", default=None, help="dashinfer-core weights: iq-int8, iq-int4, a8w8, gguf (the GGUF file as it is; others as-is)")
    p.add_argument("--out", default=str(HERE / "out"), help="folder for the PNG and JSON")
    p.add_argument("--tag", default="throughput")
    args = p.parse_args(argv)

    from dashinfer_core.loader import resolve_model_dir
    from dashinfer_core.loader.default_model import gguf_path
    from dashinfer_core.models import load_model_config
    model_dir = str(resolve_model_dir(args.model))
    vocab = load_model_config(Path(model_dir)).vocab_size
    prompts = make_prompts(args.num_prompts, args.min_input_len, args.max_input_len, vocab)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts_file = out_dir / f"{args.tag}-prompts.json"
    prompts_file.write_text(json.dumps(prompts))

    names = list(ALL_ENGINES) if args.engines == "all" else args.engines.split(",")
    results = []
    for name in names:
        python = engine_available(name)
        if python is None:
            print(f"[skip] {name}: not installed here", flush=True)
            results.append(Result(engine=name, error="not installed"))
            continue
        spec = dict(model_dir=model_dir, prompts_file=str(prompts_file), output_len=args.output_len,
                    threads=args.threads, dtype=args.dtype, device=args.device, hf_batch_size=args.hf_batch_size,
                    gguf_path=str(gguf_path()), single_stream=args.single_stream,
                    quantization=args.quantization)
        print(f"[run] {name} ...", flush=True)
        t0 = time.perf_counter()
        result = run_engine_subprocess(name, spec, python)
        print(f"[done] {name} in {time.perf_counter() - t0:.0f} s" + (f": {result.error[:300]}" if result.error else ""),
              flush=True)
        results.append(result)

    title = (f"{args.num_prompts} prompts ({args.min_input_len}-{args.max_input_len} tokens) x "
             f"{args.output_len} new tokens, greedy, {args.dtype}, {args.threads} threads, {args.device}"
             + (", one prompt at a time" if args.single_stream else ""))
    print()
    print_table(results, title)
    (out_dir / f"{args.tag}.json").write_text(json.dumps([r.__dict__ for r in results], indent=2))
    png = write_bar_chart(results, title, out_dir / f"{args.tag}.png")
    if png:
        print(f"\nwrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
