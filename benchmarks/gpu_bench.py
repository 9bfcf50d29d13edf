"""GPU benchmark table (run by benchmarks/gpu_check.sh on a CUDA machine).

On a random-weight ~0.5B Qwen2-style model in bfloat16 (built from a config; nothing downloaded):
  1. device-to-device copy bandwidth (the ceiling the other rows are compared with);
  2. paged decode attention at batch 64 x context 4096: achieved bandwidth;
  3. decode step at batch 1 / 16 / 64 (context 512): CUDA-graph forward time and the whole engine
     step (scheduling, sampling, host sync), with the bandwidth the forward achieves;
  4. throughput at batch 64 against HF transformers generate on the same model.
"""
from __future__ import annotations

import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"), str(Path(__file__).resolve().parents[1] / "tests" / "gpu")]


def cuda_time(fn, reps=50, warmup=5) -> float:
    """Mean seconds per call, timed with CUDA events."""
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def copy_bandwidth() -> float:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    t = cuda_time(lambda: dst.copy_(src), reps=20)
    return 2 * src.numel() / t  # bytes read + written


def decode_attention_bandwidth() -> tuple[float, float]:
    from dashinfer_kernels.paged_decode_attention import choose_num_splits, paged_decode_attention
    batch, ctx, hq, hkv, d, bs = 64, 4096, 14, 2, 64, 32
    blocks_per_seq = ctx // bs
    num_blocks = batch * blocks_per_seq
    k_cache = torch.randn(num_blocks, hkv, bs, d, device="cuda", dtype=torch.bfloat16)
    v_cache = torch.randn_like(k_cache)
    tables = torch.randperm(num_blocks, device="cuda").to(torch.int32).view(batch, blocks_per_seq)
    seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device="cuda")
    q = torch.randn(batch, hq, d, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(q)
    splits = choose_num_splits(batch, hkv, blocks_per_seq, torch.cuda.get_device_properties(0).multi_processor_count)
    moved = 2 * k_cache.numel() * k_cache.element_size()
    t = cuda_time(lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d ** -0.5,
                                                 num_splits=splits, out=out))
    sweep = []
    for s in (8, 16, 32, 64):
        for warps in (1, 2, 4, 8):
            ts = cuda_time(lambda: paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d ** -0.5,
                                                          num_splits=s, out=out, num_warps=warps), reps=20)
            sweep.append((ts, s, warps))
    sweep.sort()
    print("decode attention sweep (us, splits, warps), best first:",
          [(round(x * 1e6, 1), s, w) for x, s, w in sweep[:6]], flush=True)
    return moved / t, t


def engine_decode_rows(model_dir: str, batches=(1, 16, 64), ctx=512, steps=32):
    from dashinfer_core import LLM, SamplingParams
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", skip_tokenizer_init=True, max_num_seqs=64,
              kv_cache_memory=8 << 30)
    engine, runner = llm.engine, llm.engine.runner
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    cfg = runner.model_cfg
    kv_bytes_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * 2
    rng = random.Random(0)
    rows = []
    for batch in batches:
        for i in range(batch):
            engine.add_request(f"b{batch}-{i}", [rng.randrange(100, 150000) for _ in range(ctx)],
                               SamplingParams(max_tokens=steps + 8, temperature=0.0, ignore_eos=True))
        while any(s.num_uncomputed_tokens > 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
            engine.step()  # prefill
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            engine.step()
        step_s = (time.perf_counter() - t0) / steps
        # The graph replay alone, with the inputs of the last step left in the static buffers.
        size = next(s for s in runner.graphs.capture_sizes if s >= batch)
        graph = runner.graphs.graphs[size][0]
        fwd_s = cuda_time(graph.replay, reps=30)
        moved = weight_bytes + batch * (ctx + steps) * kv_bytes_per_token
        rows.append((batch, fwd_s, step_s, moved / fwd_s))
        while engine.has_unfinished_requests():
            engine.step()
    return rows, weight_bytes


def throughput_vs_hf(model_dir: str, batch=64, ctx=256, new_tokens=128):
    from transformers import AutoModelForCausalLM

    from dashinfer_core import LLM, SamplingParams
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 150000) for _ in range(rng.randint(ctx // 2, ctx))] for _ in range(batch)]
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", skip_tokenizer_init=True, max_num_seqs=batch,
              kv_cache_memory=8 << 30)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:4], SamplingParams(max_tokens=4, ignore_eos=True))
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    ours = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t0)
    del llm
    torch.cuda.empty_cache()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda().eval()
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts], device="cuda")
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device="cuda")
    with torch.no_grad():
        hf.generate(ids[:4], attention_mask=mask[:4], max_new_tokens=4, do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                          do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
    theirs = (out.shape[1] - width) * batch / (time.perf_counter() - t0)
    return ours, theirs


def prefix_cache_ttft(model_dir: str, length: int = 4000, runs: int = 3):
    """TTFT of one `length`-token prompt (1 output token) after a request shared its first 0/90/99 %."""
    import statistics

    from dashinfer_core import LLM, SamplingParams
    llm = LLM(model_dir, dtype="bfloat16", device="cuda", skip_tokenizer_init=True, max_num_batched_tokens=8192,
              kv_cache_memory=8 << 30)
    rng = random.Random(2)
    prompt = [rng.randrange(100, 150000) for _ in range(length)]
    one = SamplingParams(max_tokens=1, ignore_eos=True)
    llm.generate([prompt[:64]], one)
    rows = []
    for rate in (0.0, 0.9, 0.99):
        times = []
        for _ in range(runs):
            llm.reset_prefix_cache()
            cached = int(rate * length)
            if cached:
                llm.generate([prompt[:cached] + [7, 8, 9]], one)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            llm.generate([prompt], one)
            times.append(time.perf_counter() - t0)
        rows.append((rate, statistics.median(times)))
    return rows


def quantized_decode(model_dir: str, batch: int = 16, ctx: int = 512, steps: int = 32):
    """Forward (graph replay) time of a decode step at `batch` for each quantization mode."""
    from dashinfer_core import LLM, SamplingParams
    rows = []
    for name, options in (("bf16", {}), ("iq-int8", dict(quantization="iq-int8")),
                          ("iq-int4 g128", dict(quantization="iq-int4", group_size=128)),
                          ("kv int8", dict(kv_cache_dtype="int8"))):
        llm = LLM(model_dir, dtype="bfloat16", device="cuda", skip_tokenizer_init=True, max_num_seqs=batch,
                  kv_cache_memory=4 << 30, **options)
        engine, runner = llm.engine, llm.engine.runner
        rng = random.Random(3)
        for i in range(batch):
            engine.add_request(f"q{i}", [rng.randrange(100, 150000) for _ in range(ctx)],
                               SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
        for _ in range(4):
            engine.step()
        graph = runner.graphs.graphs[next(s for s in runner.graphs.capture_sizes if s >= batch)][0]
        rows.append((name, cuda_time(graph.replay, reps=30)))
        while engine.has_unfinished_requests():
            engine.step()
        del llm, engine, runner
        torch.cuda.empty_cache()
    return rows


def main() -> int:
    from test_cuda_engine import build_qwen2_half_b  # the same model the CUDA tests use
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name(0)
    print(f"device: {name}; torch {torch.__version__}")
    copy_bw = copy_bandwidth()
    print(f"device-to-device copy: {copy_bw / 1e12:.2f} TB/s (bytes read + written)", flush=True)
    attn_bw, attn_t = decode_attention_bandwidth()
    print(f"paged decode attention, batch 64 x context 4096, 14/2 heads, d 64, bf16: {attn_t * 1e6:.1f} us, "
          f"{attn_bw / 1e12:.2f} TB/s = {100 * attn_bw / copy_bw:.0f}% of copy", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(build_qwen2_half_b(Path(tmp) / "qwen2-0.5b"))
        rows, weight_bytes = engine_decode_rows(model_dir)
        print(f"\nQwen2-style 0.5B (random weights), bf16, {weight_bytes / 1e9:.2f} GB of weights, context 512")
        print(f"{'batch':>5} {'forward ms':>11} {'engine step ms':>15} {'forward TB/s':>13} {'% of copy':>10}")
        for batch, fwd, step, bw in rows:
            print(f"{batch:>5} {fwd * 1e3:>11.3f} {step * 1e3:>15.3f} {bw / 1e12:>13.2f} {100 * bw / copy_bw:>9.0f}%")
        sys.stdout.flush()
        ours, hf = throughput_vs_hf(model_dir)
        print(f"\nbatch 64, 128-256 prompt tokens, 128 new tokens, bf16: dashinfer-core {ours:.0f} tok/s, "
              f"HF generate {hf:.0f} tok/s, ratio {ours / hf:.1f}x", flush=True)
        for section in (prefix_cache_ttft, quantized_decode):
            try:
                rows = section(model_dir)
            except Exception as exc:  # report and go on: one broken section must not hide the others
                print(f"\n{section.__name__} failed: {type(exc).__name__}: {exc}", flush=True)
                continue
            if section is prefix_cache_ttft:
                base = rows[0][1]
                print("\nprefix cache, one 4000-token prompt, 1 output token, bf16 (median of 3):")
                for rate, t in rows:
                    print(f"  hit {rate * 100:>3.0f}%: TTFT {t * 1e3:7.2f} ms = {100 * t / base:5.1f}% of the 0 % row")
            else:
                print("\ndecode step (graph replay) at batch 16, context 512, by quantization mode:")
                for name, t in rows:
                    print(f"  {name:<14} {t * 1e3:.3f} ms")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
