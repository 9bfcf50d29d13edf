"""Shared plumbing for the peer-engine runners (standard library only: each runner runs in its own venv).

Protocol: `<venv>/bin/python <runner>.py '<SPEC_JSON>'` (the argument may also be the path of a JSON
file). The runner prints exactly one line `RESULT {...}` whose keys are those of `harness.Result`:
engine, tokens_per_s, ttft_p50_s, tpot_p50_ms, peak_mem_mb, num_tokens, elapsed_s, note, error.

Optional spec keys understood by every runner besides the documented ones:
  single_stream  (bool)  one prompt at a time instead of one concurrent batch
  warmup         (bool, default true) a tiny untimed generation before the timed one
  dump_tokens    (path)  write the generated token ids (list per prompt) there, for correctness checks
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
import traceback
from pathlib import Path

RESULT_KEYS = ("engine", "tokens_per_s", "ttft_p50_s", "tpot_p50_ms", "peak_mem_mb", "num_tokens",
               "elapsed_s", "note", "error")


def load_spec(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        raise SystemExit("usage: runner.py '<SPEC_JSON>' (or a path to a JSON file)")
    arg = argv[0]
    if arg.lstrip().startswith("{"):
        spec = json.loads(arg)
    else:
        spec = json.loads(Path(arg).read_text())
    spec.setdefault("threads", 2)
    spec.setdefault("dtype", "float32")
    spec.setdefault("single_stream", False)
    spec.setdefault("warmup", True)
    return spec


def load_prompts(spec: dict) -> list[list[int]]:
    prompts = json.loads(Path(spec["prompts_file"]).read_text())
    if not prompts or not all(isinstance(p, list) and p and all(isinstance(t, int) for t in p) for p in prompts):
        raise ValueError("prompts_file must hold a non-empty JSON list of non-empty token-id lists")
    return prompts


def peak_mem_mb(children: bool = False) -> float:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux), plus the largest child's
    peak when the engine runs worker processes (RUSAGE_CHILDREN covers waited-for children only)."""
    mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if children:
        mb += resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return mb


def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def make_result(engine: str, *, num_tokens=None, elapsed_s=None, ttfts=None, tpots_ms=None,
                peak_mb=None, note="", error=None) -> dict:
    res = dict.fromkeys(RESULT_KEYS)
    res.update(engine=engine, note=note, error=error, num_tokens=num_tokens, elapsed_s=elapsed_s,
               peak_mem_mb=peak_mb)
    if num_tokens is not None and elapsed_s:
        res["tokens_per_s"] = num_tokens / elapsed_s
    res["ttft_p50_s"] = median(ttfts or [])
    res["tpot_p50_ms"] = median(tpots_ms or [])
    return res


def emit(result: dict) -> None:
    unknown = set(result) - set(RESULT_KEYS)
    if unknown:
        raise KeyError(f"unknown result keys {sorted(unknown)}")
    sys.stdout.flush()
    sys.stderr.flush()
    print("RESULT " + json.dumps({k: result.get(k) for k in RESULT_KEYS}), flush=True)


def dump_tokens(spec: dict, outputs: list[list[int]]) -> None:
    path = spec.get("dump_tokens")
    if path:
        Path(path).write_text(json.dumps(outputs))


def check_lengths(outputs: list[list[int]], output_len: int) -> str:
    """'' when every prompt produced exactly output_len tokens, else a short complaint for the note."""
    bad = [i for i, o in enumerate(outputs) if len(o) != output_len]
    if not bad:
        return ""
    return f"; WARNING {len(bad)} prompt(s) did not produce exactly {output_len} tokens " \
           f"(e.g. #{bad[0]}: {len(outputs[bad[0]])})"


def main_wrapper(engine: str, run, children: bool = False) -> int:
    """Run `run(spec) -> dict` and print its RESULT; on any failure print a RESULT with `error` set."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        spec = load_spec()
    except Exception as exc:  # noqa: BLE001
        emit(make_result(engine, error=f"bad spec: {exc!r}"))
        return 2
    try:
        result = run(spec)
    except BaseException as exc:  # noqa: BLE001 - report everything, KeyboardInterrupt included
        traceback.print_exc(file=sys.stderr)
        emit(make_result(engine, peak_mb=peak_mem_mb(children), error=f"{type(exc).__name__}: {exc}"[:2000]))
        return 1
    emit(result)
    return 0 if result.get("error") is None else 1


class Clock:
    """Monotonic seconds since the start of the generation phase."""

    def __init__(self):
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
