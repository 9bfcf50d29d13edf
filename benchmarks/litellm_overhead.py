"""What the LiteLLM proxy adds: proxy start-up time, and requests/s of 16 concurrent clients through the
proxy (engine in-process behind it) against the same requests at the same concurrency straight into the
engine (AsyncEngine in this process, what LLM.generate drives), in one run.

    python benchmarks/litellm_overhead.py [--requests 32] [--concurrency 16] [--max-tokens 64]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

CONFIG = """model_list:
  - model_name: smollm2
    litellm_params: {{model: dashinfer/default, num_threads: {threads}}}
litellm_settings:
  custom_provider_map:
    - {{provider: dashinfer, custom_handler: dashinfer_litellm.handler}}
"""


def prompts(count):
    return [[{"role": "user", "content": f"Describe item number {i} in a short paragraph."}] for i in range(count)]


async def through_proxy(base, key, messages, concurrency, max_tokens):
    import httpx
    limit = asyncio.Semaphore(concurrency)
    headers = {"Authorization": f"Bearer {key}"}
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(m):
            async with limit:
                r = await client.post(f"{base}/v1/chat/completions", headers=headers,
                                      json={"model": "smollm2", "messages": m, "temperature": 0,
                                            "max_tokens": max_tokens})
                r.raise_for_status()
                return r.json()["usage"]["completion_tokens"]
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(m) for m in messages))
        return time.perf_counter() - start, sum(tokens)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    import requests
    from servers import Process, free_port, wait_until

    messages = prompts(args.requests)
    log_dir = Path(tempfile.mkdtemp(prefix="litellm-bench-"))
    (log_dir / "config.yaml").write_text(CONFIG.format(threads=args.threads))
    key = "sk-" + secrets.token_hex(16)
    port = free_port()
    exe = shutil.which("litellm", path=os.path.dirname(sys.executable)) or "litellm"
    t0 = time.perf_counter()
    proc = Process([exe, "--config", str(log_dir / "config.yaml"), "--host", "127.0.0.1", "--port", str(port)],
                   log_dir, "proxy", env={"LITELLM_MASTER_KEY": key, "LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                          "OMP_NUM_THREADS": str(args.threads)})
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: requests.get(f"{base}/health/liveliness", timeout=2).ok, 180, "proxy", [proc])
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        asyncio.run(through_proxy(base, key, messages[:1], 1, 4))  # first request loads the model
        first_request = time.perf_counter() - t1
        proxy_s, proxy_tokens = asyncio.run(through_proxy(base, key, messages, args.concurrency, args.max_tokens))
    finally:
        proc.stop()

    import torch
    torch.set_num_threads(args.threads)
    from dashinfer_core import AsyncEngine, SamplingParams
    from dashinfer_core.llm import apply_chat_template
    engine = AsyncEngine()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0)

    async def direct():
        limit = asyncio.Semaphore(args.concurrency)

        async def one(m):
            async with limit:
                async for out in engine.generate(apply_chat_template(engine.tokenizer, m), params):
                    last = out
                return len(last.token_ids)
        await one(messages[0])
        start = time.perf_counter()
        tokens = await asyncio.gather(*(one(m) for m in messages))
        return time.perf_counter() - start, sum(tokens)

    direct_s, direct_tokens = asyncio.run(direct())
    engine.shutdown()

    print(f"LiteLLM proxy start-up: {startup:.1f} s to healthy, first request (engine load) {first_request:.1f} s")
    print(f"{args.requests} chat requests, {args.max_tokens} max tokens, greedy, {args.threads} threads:")
    print(f"  through the proxy, {args.concurrency} concurrent clients: {args.requests / proxy_s:.2f} req/s, "
          f"{proxy_tokens / proxy_s:.1f} tok/s")
    print(f"  the engine directly, {args.concurrency} concurrent tasks: {args.requests / direct_s:.2f} req/s, "
          f"{direct_tokens / direct_s:.1f} tok/s")
    print(f"  proxy / direct: {direct_s / proxy_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
