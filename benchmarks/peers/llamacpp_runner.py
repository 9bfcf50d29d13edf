"""llama.cpp (llama-cpp-python 0.3.36, compiled here with -march=native) runner for the peer benchmark.

    benchmarks/.venvs/llamacpp/bin/python benchmarks/peers/llamacpp_runner.py '<SPEC_JSON>'

Always runs the GGUF file (spec["gguf_path"], SmolLM2 Q4_1); spec["dtype"] is ignored and the note
says so. Uses llama.cpp's low-level C API through ctypes, because the high-level `Llama` class
drives a single sequence:

- batched: one context with one sequence id per prompt (n_seq_max = number of prompts, kv_unified
  off, so each sequence gets its own n_ctx / n_seq_max slice of the KV cache). Every prompt is
  prefilled in shared batches of up to n_batch tokens (logits only at each prompt's last token),
  then each decode step feeds one token per sequence in a single llama_decode call.
- single_stream: a one-sequence context; prompts one after the other, KV cache cleared in between.

Greedy = argmax of the logits; EOS is not special (generation always runs output_len steps).

Optional spec keys: llamacpp_n_batch (default 2048), llamacpp_n_ubatch (default 512),
llamacpp_flash_attn (-1 auto = llama.cpp's default, 0 off, 1 on).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ENGINE = "llama.cpp"


class _Ctx:
    """A llama.cpp context plus a reusable batch."""

    def __init__(self, L, model, n_seq: int, n_ctx_seq: int, threads: int, n_batch: int, n_ubatch: int,
                 flash_attn: int):
        self.L = L
        p = L.llama_context_default_params()
        p.n_seq_max = n_seq
        p.n_ctx = n_seq * n_ctx_seq
        p.n_batch = n_batch
        p.n_ubatch = min(n_ubatch, n_batch)
        p.n_threads = threads
        p.n_threads_batch = threads
        p.kv_unified = False
        p.no_perf = True
        if hasattr(p, "n_outputs_max"):
            p.n_outputs_max = 0   # 0 = n_batch
        if flash_attn in (0, 1) and hasattr(p, "flash_attn_type"):
            p.flash_attn_type = flash_attn
        self.ctx = L.llama_init_from_model(model, p)
        if not self.ctx:
            raise RuntimeError("llama_init_from_model failed")
        self.n_batch = L.llama_n_batch(self.ctx)
        self.batch = L.llama_batch_init(self.n_batch, 0, 1)
        self.mem = L.llama_get_memory(self.ctx)
        vocab = L.llama_model_get_vocab(model)
        self.n_vocab = L.llama_vocab_n_tokens(vocab)

    def clear(self):
        self.L.llama_memory_clear(self.mem, True)

    def decode(self, items):
        """items: list of (token, pos, seq_id, want_logits); len <= n_batch."""
        b = self.batch
        for i, (tok, pos, seq, out) in enumerate(items):
            b.token[i] = tok
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if out else 0
        b.n_tokens = len(items)
        rc = self.L.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")

    def argmax(self, i: int, np):
        ptr = self.L.llama_get_logits_ith(self.ctx, i)
        return int(np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).argmax())

    def free(self):
        self.L.llama_batch_free(self.batch)
        self.L.llama_free(self.ctx)


def _generate(ctx: _Ctx, prompts, output_len: int, clock, np):
    """Prefill every prompt (shared batches), then decode all sequences together, output_len steps.
    Returns per-sequence tokens, first-token times and last-token times (clock seconds)."""
    n = len(prompts)
    toks = [[] for _ in range(n)]
    first = [None] * n
    last = [None] * n
    # prefill: a flat list of (token, pos, seq, is_last)
    flat = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
    for start in range(0, len(flat), ctx.n_batch):
        chunk = flat[start:start + ctx.n_batch]
        ctx.decode(chunk)
        now = None
        for i, (_, _, s, out) in enumerate(chunk):
            if out:
                toks[s].append(ctx.argmax(i, np))
                now = now or clock()
                first[s] = last[s] = now
    # decode: one token per sequence per step, all sequences in one batch
    for step in range(1, output_len):
        ctx.decode([(toks[s][-1], len(prompts[s]) + step - 1, s, True) for s in range(n)])
        for s in range(n):
            toks[s].append(ctx.argmax(s, np))
        now = clock()
        for s in range(n):
            last[s] = now
    return toks, first, last


def run(spec: dict) -> dict:
    threads = int(spec["threads"])
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import numpy as np
    import llama_cpp as L

    gguf = Path(spec.get("gguf_path") or "").expanduser()
    if not gguf.is_file():
        raise FileNotFoundError(f"gguf_path {str(gguf)!r} is not a file")
    prompts = C.load_prompts(spec)
    output_len = int(spec["output_len"])
    if output_len < 1:
        raise ValueError("output_len must be >= 1")
    single = bool(spec.get("single_stream"))
    n_batch = int(spec.get("llamacpp_n_batch", 2048))
    n_ubatch = int(spec.get("llamacpp_n_ubatch", 512))
    flash = int(spec.get("llamacpp_flash_attn", -1))

    L.llama_backend_init()
    mp = L.llama_model_default_params()
    mp.n_gpu_layers = 0
    model = L.llama_model_load_from_file(str(gguf).encode(), mp)
    if not model:
        raise RuntimeError(f"could not load {gguf}")
    n_ctx_seq = -(-(max(len(p) for p in prompts) + output_len + 1) // 256) * 256
    ctx = _Ctx(L, model, 1 if single else len(prompts), n_ctx_seq, threads, n_batch, n_ubatch, flash)
    try:
        if spec.get("warmup", True):
            _generate(ctx, [prompts[0][:16]], 2, C.Clock(), np)
            ctx.clear()
        clock = C.Clock()
        if single:
            tokens, ttfts, tpots = [], [], []
            for p in prompts:
                t_sub = clock()
                t, f, l = _generate(ctx, [p], output_len, clock, np)
                ctx.clear()
                tokens += t
                ttfts.append(f[0] - t_sub)
                if len(t[0]) > 1:
                    tpots.append((l[0] - f[0]) / (len(t[0]) - 1) * 1000)
            elapsed = clock()
        else:
            tokens, first, last = _generate(ctx, prompts, output_len, clock, np)
            elapsed = clock()
            ttfts = first
            tpots = [(l - f) / (len(t) - 1) * 1000 for t, f, l in zip(tokens, first, last) if len(t) > 1]
    finally:
        ctx.free()
        L.llama_model_free(model)

    C.dump_tokens(spec, tokens)
    num_tokens = sum(len(t) for t in tokens)
    note = (f"GGUF Q4_1 weights ({gguf.name}; dtype {spec['dtype']!r} ignored), f16 KV cache, {threads} threads, "
            + ("single stream" if single else
               f"one batch of {len(prompts)} sequences (seq id per prompt, kv_unified off), "
               f"prefill in shared chunks of n_batch {ctx.n_batch}, n_ubatch {min(n_ubatch, n_batch)}")
            + f", flash_attn {'auto' if flash not in (0, 1) else flash}, greedy argmax")
    if single:
        note += ", TTFT from each request submission"
    note += C.check_lengths(tokens, output_len)
    return C.make_result(ENGINE, num_tokens=num_tokens, elapsed_s=elapsed, ttfts=ttfts, tpots_ms=tpots,
                         peak_mb=C.peak_mem_mb(), note=note)


if __name__ == "__main__":
    sys.exit(C.main_wrapper(ENGINE, run))
