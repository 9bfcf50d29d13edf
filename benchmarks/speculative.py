"""Speculative decoding on the embedded model, with and without speculation in one run (greedy; the outputs
are checked to be the same token for token):

  (a) extraction: single-stream chat requests whose answers repeat spans of the prompt (repeat or quote a
      passage of tests/data/public_domain_prose.txt), n-gram prompt lookup;
  (b) ordinary chat, single stream, a draft model: the embedded model's own GGUF 4-bit weights (Q4_1/Q8_0, run
      by torch's int4 kernel where the CPU has one) drafting for the fp32 target;
  (c) batched throughput, 64 prompts x 128 tokens (random-token prompts as in throughput.py, EOS ignored), with
      n-gram speculation enabled at its default settings.

    python benchmarks/speculative.py [--k 4] [--threads 2] [--skip b]
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEXT = HERE.parent / "tests" / "data" / "public_domain_prose.txt"

CHAT = ["What are three good habits for staying healthy?", "Explain what a rainbow is to a child.",
        "Write a short poem about the sea.", "Give me two tips for learning a new language.",
        "Why is the sky blue?", "Describe a cat in three sentences."]


def extraction_prompts(tokenizer, count: int) -> list[str]:
    paragraphs = [p.strip() for p in TEXT.read_text().split("\n\n") if 200 < len(p.strip()) < 900]
    asks = ["Repeat the following passage word for word.", "Quote the first two sentences of this passage exactly.",
            "Copy this text exactly as it is written."]
    prompts = []
    for i in range(count):
        message = f"{asks[i % len(asks)]}\n\n{paragraphs[i % len(paragraphs)]}"
        prompts.append(tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                                     add_generation_prompt=True))
    return prompts


def single_stream(llm, prompts, max_tokens: int):
    from dashinfer_core import SamplingParams
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    llm.generate(prompts[:1], SamplingParams(max_tokens=8, temperature=0.0))  # warm-up
    outs, start = [], time.perf_counter()
    for prompt in prompts:
        outs += llm.generate([prompt], params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "elapsed_s": elapsed,
            "drafts": sum(o.num_draft_tokens for o in outs), "accepted": sum(o.num_accepted_tokens for o in outs),
            "outputs": [o.outputs[0].token_ids for o in outs]}


def batched(llm, prompts, max_tokens: int):
    from dashinfer_core import SamplingParams
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"tokens_per_s": tokens / elapsed, "tokens": tokens, "elapsed_s": elapsed,
            "drafts": sum(o.num_draft_tokens for o in outs), "accepted": sum(o.num_accepted_tokens for o in outs),
            "outputs": [o.outputs[0].token_ids for o in outs]}


def compare(name: str, speculative, run, prompts, max_tokens: int, threads: int) -> dict:
    from dashinfer_core import LLM
    results = {}
    for label, spec in (("off", None), ("on", speculative)):
        llm = LLM(dtype="float32", device="cpu", num_threads=threads, enable_prefix_caching=False, speculative=spec)
        results[label] = run(llm, prompts, max_tokens)
        llm.shutdown()
        del llm
    off, on = results["off"], results["on"]
    row = {"workload": name, "speculative": json.dumps(speculative), "tok_s_off": off["tokens_per_s"],
           "tok_s_on": on["tokens_per_s"], "speedup": on["tokens_per_s"] / off["tokens_per_s"],
           "drafts": on["drafts"], "accepted": on["accepted"],
           "acceptance": on["accepted"] / on["drafts"] if on["drafts"] else 0.0,
           "tokens": on["tokens"], "same_output": on["outputs"] == off["outputs"]}
    print(f"{name}: off {row['tok_s_off']:.1f} tok/s, on {row['tok_s_on']:.1f} tok/s, x{row['speedup']:.2f}, "
          f"acceptance {row['acceptance']:.2f} ({row['accepted']}/{row['drafts']}), same output: "
          f"{row['same_output']}", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--k", type=int, default=8, help="num_speculative_tokens for (a) and (c)")
    p.add_argument("--draft-k", type=int, default=3, help="num_speculative_tokens for (b)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=6, help="single-stream requests in (a) and (b)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--skip", default="", help="comma-separated workloads to leave out: a, b, c")
    p.add_argument("--out", default=str(HERE / "out" / "speculative.json"))
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    skip = set(args.skip.split(","))
    rows = []
    from transformers import AutoTokenizer
    from dashinfer_core.loader import default_model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    ngram = {"method": "ngram", "num_speculative_tokens": args.k}
    if "a" not in skip:
        rows.append(compare("(a) extraction, single stream, n-gram", ngram, single_stream,
                            extraction_prompts(tokenizer, args.prompts), args.max_tokens, args.threads))
    if "b" not in skip:
        chats = [tokenizer.apply_chat_template([{"role": "user", "content": c}], tokenize=False,
                                               add_generation_prompt=True) for c in CHAT[:args.prompts]]
        draft = {"method": "draft", "model": "default", "quantization": "gguf", "num_speculative_tokens": args.draft_k}
        rows.append(compare("(b) chat, single stream, GGUF int4 draft", draft, single_stream, chats,
                            args.max_tokens, args.threads))
    if "c" not in skip:
        rng = random.Random(0)
        prompts = [[rng.randrange(100, tokenizer.vocab_size) for _ in range(rng.randint(32, 512))] for _ in range(64)]
        rows.append(compare("(c) batched 64 x 128, n-gram at default settings", ngram, batched, prompts, 128,
                            args.threads))
    print("\n| workload | tok/s off | tok/s on | on/off | acceptance | same output |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['workload']} | {r['tok_s_off']:.1f} | {r['tok_s_on']:.1f} | {r['speedup']:.2f}x | "
              f"{r['acceptance']:.2f} ({r['accepted']}/{r['drafts']}) | {r['same_output']} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["same_output"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
