"""Vision-language serving on the CPU: a random Qwen2-VL built from a transformers config (a SmolLM2-135M-
sized language model, a 12-block vision tower), one 224x224 image + a question per request. Requests/s
at 16 concurrent (AsyncEngine streams) against HF transformers generate in batches of 16 on the same
model and requests, in one run; and time to first token for an image seen before (encoder cache and
prefix cache hit) against a new one.

    python benchmarks/vlm.py [--requests 32] [--output-len 32] [--concurrency 16] [--threads 2]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

MODEL = Path("/tmp/dashinfer-vlm-bench")
# The tests' minimal Qwen2-VL chat template (image parts as <|vision_start|><|image_pad|><|vision_end|>).
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from helpers import CHAT_TEMPLATE as TEMPLATE  # noqa: E402
QUESTIONS = ["What is in this picture?", "Describe the colours in detail.", "What stands out here?"]


def build(path: Path) -> None:
    import torch
    import transformers
    from dashinfer_core.loader import default_model_dir
    tok = transformers.AutoTokenizer.from_pretrained(str(default_model_dir()))
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]})
    tok.chat_template = TEMPLATE
    ids = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=-(-len(tok) // 64) * 64, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         max_position_embeddings=8192, eos_token_id=2, bos_token_id=1,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e5}),
        vision_config=dict(depth=12, embed_dim=384, hidden_size=576, num_heads=6, mlp_ratio=4, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=ids[2], vision_start_token_id=ids[0], vision_end_token_id=ids[1], tie_word_embeddings=True)
    torch.manual_seed(0)
    model = transformers.Qwen2VLForConditionalGeneration(cfg)
    print(f"random Qwen2-VL: {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    transformers.Qwen2VLImageProcessor(min_pixels=224 * 224, max_pixels=224 * 224).save_pretrained(str(path))


def images(count: int, seed: int = 0):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (224, 224, 3), dtype=np.uint8)) for _ in range(count)]


def conversation(image, i: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image},
                                         {"type": "text", "text": QUESTIONS[i % len(QUESTIONS)]}]}]


def run_engine(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    from dashinfer_core import AsyncEngine, EngineConfig, SamplingParams
    from dashinfer_core.llm import apply_chat_template
    engine = AsyncEngine(EngineConfig(model=str(MODEL), dtype="float32", device="cpu", num_threads=spec["threads"]))
    tok = engine.tokenizer
    params = SamplingParams(max_tokens=spec["output_len"], temperature=0.0, ignore_eos=True)
    pictures = images(spec["requests"] + 2, seed=1)

    async def one(i, image, gate):
        async with gate:
            start = time.perf_counter()
            first = None
            async for out in engine.generate(apply_chat_template(tok, conversation(image, i)), params, images=[image]):
                first = first or time.perf_counter() - start
            return first

    async def main():
        await one(0, pictures[-1], asyncio.Semaphore(1))  # warm-up (a picture not used below)
        gate = asyncio.Semaphore(spec["concurrency"])
        start = time.perf_counter()
        await asyncio.gather(*(one(i, pictures[i], gate) for i in range(spec["requests"])))
        elapsed = time.perf_counter() - start
        single = asyncio.Semaphore(1)
        new = await one(0, pictures[-2], single)  # an image no request has sent
        repeated = [await one(3, pictures[3], single) for _ in range(3)]  # request 3 again: both caches hit
        return elapsed, new, min(repeated)

    try:
        elapsed, ttft_new, ttft_repeat = asyncio.run(main())
    finally:
        engine.shutdown()
    return {"requests_per_s": spec["requests"] / elapsed, "seconds": elapsed, "ttft_new": ttft_new,
            "ttft_repeat": ttft_repeat}


def run_hf(spec: dict) -> dict:
    import torch
    import transformers
    torch.set_num_threads(spec["threads"])
    model = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(MODEL), dtype=torch.float32).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(MODEL))
    tok = transformers.AutoTokenizer.from_pretrained(str(MODEL))
    image_id = model.config.image_token_id
    pictures = images(spec["requests"] + 2, seed=1)
    rows = []
    for i in range(spec["requests"]):
        ids = tok.apply_chat_template(conversation(pictures[i], i), tokenize=False, add_generation_prompt=True)
        ids = tok.encode(ids, add_special_tokens=False)
        pix = processor(images=[pictures[i]], return_tensors="pt")
        n = int(pix["image_grid_thw"].prod()) // 4
        k = ids.index(image_id)
        rows.append((ids[:k] + [image_id] * n + ids[k + 1:], pix))
    start = time.perf_counter()
    for b in range(0, len(rows), spec["concurrency"]):
        batch = rows[b:b + spec["concurrency"]]
        width = max(len(r[0]) for r in batch)
        ids = torch.tensor([[0] * (width - len(r[0])) + r[0] for r in batch])
        mask = torch.tensor([[0] * (width - len(r[0])) + [1] * len(r[0]) for r in batch])
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, pixel_values=torch.cat([r[1]["pixel_values"] for r in batch]),
                           image_grid_thw=torch.cat([r[1]["image_grid_thw"] for r in batch]),
                           mm_token_type_ids=(ids == image_id).int(), max_new_tokens=spec["output_len"],
                           min_new_tokens=spec["output_len"], do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    return {"requests_per_s": spec["requests"] / elapsed, "seconds": elapsed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--run", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.run:
        spec = json.loads(args.run)
        print(json.dumps(run_hf(spec) if spec["engine"] == "hf" else run_engine(spec)))
        return 0
    if not (MODEL / "config.json").exists():
        build(MODEL)
    spec = dict(requests=args.requests, output_len=args.output_len, concurrency=args.concurrency, threads=args.threads)
    results = {}
    for engine in ("dashinfer-core", "hf"):
        out = subprocess.run([sys.executable, __file__, "--run", json.dumps({**spec, "engine": engine})],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{engine}: failed\n{out.stderr[-2000:]}")
            continue
        results[engine] = json.loads(out.stdout.strip().splitlines()[-1])
        print(engine, results[engine], flush=True)
    print(f"\n{args.requests} requests (one 224x224 image + a question, {args.output_len} new tokens), "
          f"{args.concurrency} concurrent, fp32, {args.threads} threads")
    print("| engine | requests/s | vs HF |")
    print("|---|---|---|")
    for engine, r in results.items():
        ratio = r["requests_per_s"] / results["hf"]["requests_per_s"] if "hf" in results else float("nan")
        print(f"| {engine} | {r['requests_per_s']:.3f} | {ratio:.2f} |")
    if "dashinfer-core" in results:
        r = results["dashinfer-core"]
        print(f"\nTTFT, one request alone: new image {r['ttft_new'] * 1000:.0f} ms, the same image and question "
              f"again {r['ttft_repeat'] * 1000:.0f} ms ({r['ttft_new'] / r['ttft_repeat']:.1f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
