"""Serving benchmark against an OpenAI-compatible endpoint: a fixed set of chat requests at
concurrency 1 / 8 / 32 (streamed), reporting requests/s, output tokens/s, time to first token and
inter-token latency (p50 / p99), with a PNG.

    python benchmarks/serving.py --url http://127.0.0.1:8000/v1 --model SmolLM2-135M-Instruct
    python benchmarks/serving.py --launch ours,stock     # start each FastChat stack here, one after the other

--launch starts FastChat's controller + a worker + our OpenAI server launcher on free ports: `ours` is
dashinfer_fastchat.worker, `stock` is FastChat's own model_worker (benchmarks/stock_fastchat_worker.py),
both on the embedded model with the same thread count. Output tokens are counted by tokenizing the
streamed text with the model's tokenizer.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

TOPICS = ["the ocean", "a red bicycle", "coffee", "the moon", "winter", "a lighthouse", "bread", "trains",
          "a garden", "music", "mountains", "a library", "rain", "chess", "the desert", "a market"]


def make_requests(count: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    return [[{"role": "user", "content": f"Write a short paragraph about {rng.choice(TOPICS)}."}]
            for _ in range(count)]


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


async def one_request(client, url, model, messages, max_tokens, tokenizer):
    body = {"model": model, "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    start = time.perf_counter()
    first, stamps, text = None, [], ""
    async with client.stream("POST", f"{url}/chat/completions", json=body) as resp:
        if resp.status_code != 200:
            return None
        async for line in resp.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
            if delta:
                now = time.perf_counter()
                first = first or now
                stamps.append(now)
                text += delta
    end = time.perf_counter()
    tokens = len(tokenizer.encode(text, add_special_tokens=False))
    itl = [(b - a) / 1 for a, b in zip(stamps, stamps[1:])]
    # A chunk may carry several tokens (the stock worker streams every 2): spread its gap over them.
    per_token = (end - first) / max(1, tokens - 1) if first and tokens > 1 else None
    return dict(ttft=(first or end) - start, latency=end - start, tokens=tokens, itl=itl, per_token=per_token)


async def run_level(url, model, requests_, concurrency, max_tokens, tokenizer):
    import httpx
    limit = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=600) as client:
        async def guarded(messages):
            async with limit:
                return await one_request(client, url, model, messages, max_tokens, tokenizer)
        start = time.perf_counter()
        results = await asyncio.gather(*(guarded(m) for m in requests_))
        wall = time.perf_counter() - start
    ok = [r for r in results if r]
    tokens = sum(r["tokens"] for r in ok)
    per_token = [r["per_token"] for r in ok if r["per_token"] is not None]
    return dict(concurrency=concurrency, requests=len(requests_), completed=len(ok), wall=wall,
                req_s=len(ok) / wall, tok_s=tokens / wall, ttft_p50=pct([r["ttft"] for r in ok], 50),
                ttft_p99=pct([r["ttft"] for r in ok], 99), itl_p50=pct(per_token, 50), itl_p99=pct(per_token, 99),
                latency_p99=pct([r["latency"] for r in ok], 99))


def launch_stack(kind: str, threads: int, log_dir: Path):
    """Controller + worker + OpenAI server on free ports; returns (api url, model name, processes)."""
    import requests
    from servers import Process, free_port, python_module, wait_until

    from dashinfer_core.loader import default_model_dir
    env = {"LOGDIR": str(log_dir), "OMP_NUM_THREADS": str(threads)}
    c_port, w_port, a_port = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{c_port}"
    procs = [Process(python_module("fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(c_port)),
                     log_dir, f"{kind}-controller", env)]
    wait_until(lambda: requests.get(f"{controller}/test_connection", timeout=2).ok, 60, "controller", procs)
    common = ["--host", "127.0.0.1", "--port", str(w_port), "--worker-address", f"http://127.0.0.1:{w_port}",
              "--controller-address", controller]
    model_dir = str(default_model_dir())
    if kind == "ours":
        cmd = python_module("dashinfer_fastchat.worker", *common, "--num-threads", str(threads))
        model = "SmolLM2-135M-Instruct"
    else:
        model = "smollm2-stock"
        cmd = [sys.executable, str(HERE / "stock_fastchat_worker.py"), *common, "--model-path", model_dir,
               "--device", "cpu", "--model-names", model, "--conv-template", "dashinfer-chatml"]
    procs.append(Process(cmd, log_dir, f"{kind}-worker", env))
    procs.append(Process(python_module("dashinfer_fastchat.openai_api_server", "--host", "127.0.0.1", "--port",
                                       str(a_port), "--controller-address", controller), log_dir, f"{kind}-api", env))
    api = f"http://127.0.0.1:{a_port}/v1"
    wait_until(lambda: model in [m["id"] for m in requests.get(f"{api}/models", timeout=2).json()["data"]],
               300, f"{kind} worker to register", procs)
    return api, model, procs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="OpenAI-compatible base URL (with /v1)")
    p.add_argument("--model", default="SmolLM2-135M-Instruct")
    p.add_argument("--launch", default=None, help="comma-separated: ours, stock")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--requests-per-level", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(HERE / "out"))
    args = p.parse_args(argv)
    from transformers import AutoTokenizer

    from dashinfer_core.loader import default_model_dir
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_dir()))
    levels = [int(c) for c in args.concurrency.split(",")]
    targets = []
    if args.launch:
        targets = [(kind, None, None) for kind in args.launch.split(",")]
    else:
        targets = [("endpoint", args.url, args.model)]
    table = []
    for kind, url, model in targets:
        procs = []
        if url is None:
            log_dir = Path(tempfile.mkdtemp(prefix=f"serving-{kind}-"))
            url, model, procs = launch_stack(kind, args.threads, log_dir)
        try:
            asyncio.run(run_level(url, model, make_requests(2, seed=99), 1, 8, tokenizer))  # warm-up
            for level in levels:
                count = max(args.requests_per_level, level)
                row = asyncio.run(run_level(url, model, make_requests(count), level, args.max_tokens, tokenizer))
                row["target"] = kind
                table.append(row)
                print(f"[{kind}] concurrency {level}: {row['tok_s']:.1f} tok/s", flush=True)
        finally:
            for proc in reversed(procs):
                proc.stop()
    print(f"\nchat requests, {args.max_tokens} max new tokens, greedy, streamed; workers on {args.threads} threads")
    header = (f"{'target':<9}{'conc':>5}{'done':>6}{'req/s':>8}{'tok/s':>8}{'TTFT p50':>10}{'TTFT p99':>10}"
              f"{'ITL p50 ms':>12}{'ITL p99 ms':>12}")
    print(header)
    print("-" * len(header))
    for r in table:
        print(f"{r['target']:<9}{r['concurrency']:>5}{r['completed']:>3}/{r['requests']:<3}{r['req_s']:>7.2f}"
              f"{r['tok_s']:>8.1f}{r['ttft_p50']:>10.2f}{r['ttft_p99']:>10.2f}{r['itl_p50'] * 1e3:>12.1f}"
              f"{r['itl_p99'] * 1e3:>12.1f}")
    kinds = sorted({r["target"] for r in table})
    if "ours" in kinds and "stock" in kinds:
        for level in levels:
            a = next(r for r in table if r["target"] == "ours" and r["concurrency"] == level)
            b = next(r for r in table if r["target"] == "stock" and r["concurrency"] == level)
            print(f"concurrency {level}: ours / stock = {a['tok_s'] / b['tok_s']:.1f}x tokens/s, "
                  f"{a['req_s'] / b['req_s']:.1f}x requests/s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "serving.json").write_text(json.dumps(table, indent=2))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.8 / max(1, len(kinds))
    for k, kind in enumerate(kinds):
        rows = [r for r in table if r["target"] == kind]
        ax.bar([i + k * width for i in range(len(rows))], [r["tok_s"] for r in rows], width, label=kind)
    ax.set_xticks([i + width * (len(kinds) - 1) / 2 for i in range(len(levels))], [f"{c} clients" for c in levels])
    ax.set_ylabel("output tokens/s")
    ax.legend()
    ax.set_title("serving throughput (streamed chat completions)")
    fig.tight_layout()
    fig.savefig(out / "serving.png", dpi=110)
    print(f"\nwrote {out / 'serving.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
