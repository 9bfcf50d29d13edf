"""Quantization modes side by side on the embedded model: perplexity on a fixed English text,
memory of weights and of the KV cache, and decode speed.

The text (tests/data/public_domain_prose.txt, ~2,600 tokens) is a transcription of three public-domain
documents: the U.S. Declaration of Independence (1776), the Gettysburg Address (1863) and Lincoln's
second inaugural address (1865). Perplexity = exp(-mean log p(token | prefix)), scored through the
paged (possibly quantized) KV cache in chunks of 512 tokens.

    python benchmarks/quant.py [--device cpu] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent / "tests" / "data" / "public_domain_prose.txt"
MODES = [
    ("unquantized", {}),
    ("IQ int8 per-channel", dict(quantization="iq-int8")),
    ("IQ int8 group-128", dict(quantization="iq-int8", group_size=128)),
    ("IQ int4 per-channel", dict(quantization="iq-int4")),
    ("IQ int4 group-128", dict(quantization="iq-int4", group_size=128)),
    ("IQ int4 group-32", dict(quantization="iq-int4", group_size=32)),
    ("A8W8", dict(quantization="a8w8")),
    ("KV int8", dict(kv_cache_dtype="int8")),
    ("KV uint4", dict(kv_cache_dtype="uint4")),
    ("GGUF Q4_1 as is", dict(quantization="gguf")),
]


def weight_bytes(model) -> int:
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for name, b in model.named_buffers() if "rotary" not in name)
    return params + buffers


def decode_speed(llm, batch: int, new_tokens: int = 64) -> float:
    from dashinfer_core import SamplingParams
    prompts = [[100 + i + j for j in range(32)] for i in range(batch)]
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))
    start = time.perf_counter()
    outs = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True))
    return sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--modes", default="all", help="comma-separated indexes into the mode list")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of every mode (perplexities are against the first mode run)")
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    from dashinfer_core import LLM
    from dashinfer_core.cache.kv_cache import bytes_per_block
    from dashinfer_core.quant.kv import KV_BITS

    modes = MODES if args.modes == "all" else [MODES[int(i)] for i in args.modes.split(",")]
    rows, base_ppl = [], None
    for name, options in modes:
        llm = LLM(device=args.device, dtype=args.dtype, **options)
        ids = llm.get_tokenizer().encode(TEXT.read_text())
        scores = llm.score(ids, chunk_tokens=512)
        ppl = math.exp(-sum(scores) / len(scores))
        base_ppl = base_ppl or ppl
        runner = llm.engine.runner
        cfg = runner.model_cfg
        kv_per_token = bytes_per_block(cfg.num_layers, 1, cfg.num_kv_heads, cfg.head_dim, runner.dtype,
                                       KV_BITS[options.get("kv_cache_dtype", "auto")])
        rows.append((name, ppl, 100 * (ppl / base_ppl - 1), weight_bytes(runner.model) / 2**20, kv_per_token / 1024,
                     decode_speed(llm, 1), decode_speed(llm, 16)))
        print(f"[done] {name}", flush=True)
        del llm
    print(f"\nSmolLM2-135M-Instruct, {len(ids)}-token public-domain text, {args.device}, {args.dtype}, "
          f"{args.threads} threads")
    header = (f"{'mode':<22}{'perplexity':>11}{'vs fp32':>9}{'weights MiB':>13}{'KV KiB/token':>14}"
              f"{'tok/s b=1':>11}{'tok/s b=16':>12}")
    print(header)
    print("-" * len(header))
    for name, ppl, delta, wmb, kv, s1, s16 in rows:
        print(f"{name:<22}{ppl:>11.3f}{delta:>+8.2f}%{wmb:>13.1f}{kv:>14.1f}{s1:>11.1f}{s16:>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
