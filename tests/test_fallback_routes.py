"""Every CPU fast path off (DASHINFER_DISABLE=all, and the ISA lowered to AVX2 on x86): the routes a
machine without oneDNN, a working int8 kernel or a C++ compiler takes must give the same answers."""
from __future__ import annotations

from dashinfer_core import LLM
from fallback_run import AVX2, PROSE, X86, answers_right, mean_abs_diff, run_fallback


def test_portable_routes_with_every_fast_path_off():
    settings = [{"dtype": "float32"}, {"dtype": "bfloat16", "quantization": "iq-int8"},
                {"dtype": "float32", "quantization": "iq-int4", "group_size": 32},
                {"dtype": "float32", "quantization": "a8w8"}]
    result = run_fallback({**AVX2, "DASHINFER_DISABLE": "all"} if X86 else {"DASHINFER_DISABLE": "all"}, settings)
    fp32, int8, int4, a8w8 = result["runs"]
    for run in result["runs"]:
        assert run["errors"] == [None, None] and run["leaked_blocks"] == 0, run
        assert all(not choice.startswith("on") for choice in run["paths"].values()), run["paths"]
        assert not run["compiled_layers_ran"]
    assert answers_right(fp32) and answers_right(int8) and answers_right(a8w8), \
        (fp32["texts"], int8["texts"], a8w8["texts"])
    assert len(int4["texts"][0].split()) >= 3  # int4 is lossier: fluent, not always right
    # F.linear and oneDNN compute the same fp32 product (up to summation order).
    here = LLM(device="cpu", dtype="float32", kv_cache_memory=64 << 20)
    ids = here.get_tokenizer()(PROSE)["input_ids"][:64]
    assert mean_abs_diff(fp32["scores"], here.score(ids, chunk_tokens=24)) < 1e-3
    assert mean_abs_diff(int8["scores"], fp32["scores"]) < 0.4
