"""`make demo`: load the embedded default model, stream one chat answer to the terminal, then print
a throughput line for a small batch."""
from __future__ import annotations

import asyncio
import sys
import time

from . import AsyncEngine, SamplingParams
from .cli import stream_to_stdout
from .llm import apply_chat_template


def main() -> int:
    start = time.perf_counter()
    engine = AsyncEngine(max_num_seqs=16)
    print(f"Loaded {engine.engine.runner.model_dir.name} on {engine.engine.runner.device} "
          f"({engine.engine.runner.dtype}) in {time.perf_counter() - start:.1f} s; "
          f"KV cache: {engine.engine.stats().num_blocks} blocks of {engine.engine.config.block_size} tokens\n")
    question = "Explain in three sentences why the sky is blue."
    print(f"you> {question}\nassistant> ", end="")
    prompt = apply_chat_template(engine.tokenizer, [{"role": "user", "content": question}])
    asyncio.run(stream_to_stdout(engine, prompt, SamplingParams(max_tokens=128, temperature=0.0)))

    async def batch():
        params = SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True)
        prompts = [apply_chat_template(engine.tokenizer, [{"role": "user", "content": f"Tell me fact number {i}."}])
                   for i in range(16)]

        async def one(p):
            async for out in engine.generate(p, params):
                last = out
            return len(last.token_ids)
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(p) for p in prompts))
        return sum(counts), time.perf_counter() - t0

    tokens, elapsed = asyncio.run(batch())
    print(f"\nBatch of 16 chat requests x 64 new tokens: {tokens} tokens in {elapsed:.2f} s "
          f"= {tokens / elapsed:.1f} tokens/s")
    engine.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
