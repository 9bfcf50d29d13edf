"""Run the embedded model in the given engine settings and print what happened as JSON: the fast paths
taken, greedy chat answers, teacher-forced log-probs of a prose snippet, and leaked blocks.

    python tests/fallback_run.py '[{"dtype": "bfloat16"}, {"dtype": "bfloat16", "quantization": "iq-int8"}]'

tests/test_capabilities.py and test_fallback_routes.py run it in a subprocess (run_fallback) with ONEDNN_MAX_CPU_ISA / ATEN_CPU_CAPABILITY /
DASHINFER_DISABLE set, so a machine with AVX-512 runs what an AVX2 machine (or one without a compiler) runs.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

QUESTIONS = ["How many days are in a week?", "What is 2 plus 2?"]
PROSE = (Path(__file__).parent / "data" / "public_domain_prose.txt").read_text()[:1200]
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}
X86 = platform.machine() in ("x86_64", "AMD64")


def run_fallback(env: dict, settings: list[dict]) -> dict:
    script = Path(__file__)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **env}
    proc = subprocess.run([sys.executable, str(script), json.dumps(settings)], env=full_env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


def answers_right(run: dict) -> bool:
    days, sum_ = run["texts"]
    return "7" in days and "4" in sum_


def mean_abs_diff(a, b) -> float:
    return float((torch.tensor(a) - torch.tensor(b)).abs().mean())


def run(settings: dict) -> dict:
    from dashinfer_core import LLM, SamplingParams
    llm = LLM(device="cpu", kv_cache_memory=64 << 20, **settings)
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS], SamplingParams(max_tokens=16, temperature=0.0))
    ids = llm.get_tokenizer()(PROSE)["input_ids"][:64]
    scores = llm.score(ids, chunk_tokens=24)
    stats = llm.engine.stats()
    parts = llm.engine.runner.model.compiled_parts
    return {"settings": settings, "paths": stats.fast_paths, "texts": [o.text for o in outs],
            "errors": [o.error for o in outs], "scores": scores,
            "leaked_blocks": stats.num_blocks - stats.num_free_blocks,
            "compiled_layers_ran": parts is not None and not parts.failed,
            "compiled_layers_fell_back": [] if parts is None else parts.fell_back}


def main() -> int:
    torch.set_num_threads(1)
    from dashinfer_core.capabilities import detect
    results = [run(s) for s in json.loads(sys.argv[1])]
    print("RESULT " + json.dumps({"platform": detect().as_dict(), "runs": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
