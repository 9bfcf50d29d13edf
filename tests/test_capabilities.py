"""Fast paths are chosen by what the machine can do, each with a fallback that gives the same answers.

A machine with AVX-512 tests what an AVX2 machine runs: a subprocess with oneDNN and ATen limited to
AVX2 (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY), where oneDNN cannot build a bf16 inner product, as on
a real AVX2 CPU. tests/test_fallback_routes.py turns every fast path off.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dashinfer_core import capabilities
from dashinfer_core.capabilities import choose_cpu_paths

from fallback_run import AVX2, X86, answers_right, mean_abs_diff, run_fallback


@pytest.mark.skipif(not X86, reason="lowers the x86 ISA")
def test_avx2_machine_runs_bf16_compiled_and_int8():
    result = run_fallback(AVX2, [{"dtype": "float32"}, {"dtype": "bfloat16"},
                                 {"dtype": "bfloat16", "quantization": "iq-int8"},
                                 {"dtype": "float32", "quantization": "a8w8"}])
    assert result["platform"]["cpu_capability"] == "AVX2"
    fp32, bf16, int8, a8w8 = result["runs"]
    for run in result["runs"]:
        assert run["errors"] == [None, None] and run["leaked_blocks"] == 0, run
        assert answers_right(run), run["texts"]
    # No bf16 inner product in oneDNN below AVX512-BF16: the engine must not take that path.
    assert fp32["paths"]["onednn_linear"].startswith("on")
    assert bf16["paths"]["onednn_linear"].startswith("off") and int8["paths"]["onednn_linear"].startswith("off")
    assert bf16["paths"]["packed_linear"].startswith("off")  # nothing to pack bf16 weights for
    assert fp32["paths"]["packed_linear"].startswith("on")  # fp32 prepacking is plain AVX2 oneDNN
    if capabilities.detect().cxx_compiler:  # the compiled layers run under AVX2 code generation too
        assert bf16["compiled_layers_ran"] and bf16["paths"]["compiled_layers"].startswith("on")
        # ... each as whole graphs: a capability probe first asked inside one is a graph break (int8: the
        # compiled dequant forms' first `.active`)
        assert bf16["compiled_layers_fell_back"] == [] and int8["compiled_layers_fell_back"] == [], result["runs"]
    # bf16 is an approximation of the fp32 model: ~0.1 nat per token here; a wrong route is off by nats.
    assert mean_abs_diff(bf16["scores"], fp32["scores"]) < 0.3
    assert mean_abs_diff(int8["scores"], fp32["scores"]) < 0.4
    # oneDNN's AVX2 int8 GEMM saturates: unless the probe found it exact, a8w8 sums in fp32.
    assert mean_abs_diff(a8w8["scores"], fp32["scores"]) < 0.4


def test_choices_follow_settings_and_overrides(monkeypatch):
    monkeypatch.delenv("DASHINFER_DISABLE", raising=False)
    paths = choose_cpu_paths(torch.float32, None, None, enforce_eager=False)
    assert set(paths) == set(capabilities.FAST_PATHS)
    assert not paths["compiled_layers"].on and "float32" in paths["compiled_layers"].why
    assert not paths["int8_gemv"].on and not paths["compiled_dequant"].on
    eager = choose_cpu_paths(torch.bfloat16, "iq-int4", 32, enforce_eager=True)
    assert not eager["compiled_layers"].on and not eager["compiled_attention"].on
    monkeypatch.setenv("DASHINFER_DISABLE", "compiled_attention,int8_gemv")
    off = choose_cpu_paths(torch.bfloat16, "iq-int8", None, enforce_eager=False)
    assert not off["compiled_attention"].on and "DASHINFER_DISABLE" in off["compiled_attention"].why
    assert not off["int8_gemv"].on and "DASHINFER_DISABLE" in off["int8_gemv"].why
    # A CPU whose oneDNN has no bf16 inner product: the choice says so and names the fallback.
    monkeypatch.delenv("DASHINFER_DISABLE")
    monkeypatch.setattr(capabilities, "onednn_linear_dtypes", lambda: frozenset({torch.float32}))
    no_bf16 = choose_cpu_paths(torch.bfloat16, None, None, enforce_eager=False)
    assert not no_bf16["onednn_linear"].on and "F.linear" in no_bf16["onednn_linear"].why


def test_a_failing_onednn_call_falls_back_to_f_linear(monkeypatch):
    from dashinfer_core.layers import linear as linear_mod

    def broken(*args):
        raise RuntimeError("could not create a primitive descriptor for the inner product forward propagation")
    monkeypatch.setattr(linear_mod, "_ONEDNN_LINEAR", broken)
    monkeypatch.setattr(capabilities, "_dropped", set())
    monkeypatch.setattr(capabilities, "onednn_linear_dtypes", lambda: frozenset({torch.float32}))
    x, w = torch.randn(3, 8), torch.randn(5, 8)
    torch.testing.assert_close(linear_mod.linear(x, w), F.linear(x, w))
    assert torch.float32 in capabilities._dropped and not capabilities.onednn_linear_on(torch.float32)


def test_bf16_products_widen_to_fp32_where_bf16_is_emulated(monkeypatch):
    """Without bf16 arithmetic, bf16 products of two rows or more run in fp32 (the weight widened in chunks);
    the answer is the fp32 product rounded to bf16, chunked or not."""
    from dashinfer_core.layers import linear as linear_mod
    from dashinfer_core.layers.linear import Linear
    Linear(8, 4, False, torch.bfloat16)
    assert linear_mod._bf16_emulated == (not capabilities.native_bf16())  # settled by a bf16 layer
    monkeypatch.setattr(linear_mod, "UPCAST_CHUNK_ELEMENTS", 64 * 5)  # 5 rows of the weight a chunk
    torch.manual_seed(4)
    x, w, b = torch.randn(2, 3, 64).bfloat16(), torch.randn(23, 64).bfloat16(), torch.randn(23).bfloat16()
    want = F.linear(x.float(), w.float(), b.float()).bfloat16()
    one_ulp = dict(rtol=2 ** -7, atol=1e-6)  # fp32 sums in another order may round to the next bf16
    torch.testing.assert_close(linear_mod.upcast_linear(x, w, b).float(), want.float(), **one_ulp)
    torch.testing.assert_close(linear_mod.upcast_linear(x, w, None).float(),
                               F.linear(x.float(), w.float()).bfloat16().float(), **one_ulp)
    calls = []
    monkeypatch.setattr(linear_mod, "_bf16_emulated", True)
    monkeypatch.setattr(linear_mod, "upcast_linear", lambda *a: calls.append(a[0].shape) or want)
    linear_mod.linear(x, w, b)
    linear_mod.linear(x[:1, :1], w, b)  # one row stays bf16 (the emulated GEMV is faster than widening)
    linear_mod.linear(x.float(), w.float(), b.float())
    assert calls == [x.shape]


def test_single_row_gemv_route_is_timed_once_per_shape(monkeypatch):
    """One fp32 row: MKL or oneDNN, picked by timing both once per weight shape (the weight evicted from
    the caches before each timed call); later calls reuse the pick; either route gives F.linear's answer."""
    from dashinfer_core.layers import linear as linear_mod
    monkeypatch.setattr(linear_mod, "_gemv_choice", {})
    monkeypatch.setattr(capabilities, "onednn_linear_dtypes", lambda: frozenset({torch.float32}))
    monkeypatch.setattr(capabilities, "_dropped", set())
    monkeypatch.setattr(linear_mod, "EVICT_BYTES", 1 << 20)
    calls = {"onednn": 0}
    real = linear_mod._ONEDNN_LINEAR

    def counted(*args):
        calls["onednn"] += 1
        return real(*args)
    monkeypatch.setattr(linear_mod, "_ONEDNN_LINEAR", counted)
    x, w = torch.randn(1, 64), torch.randn(96, 64)
    torch.testing.assert_close(linear_mod.linear(x, w), F.linear(x, w))
    assert list(linear_mod._gemv_choice) == [((96, 64), False)]
    timed = calls["onednn"]
    assert timed >= 6  # the primitive build, five timed calls (and the call itself when picked)
    for pick in (True, False):  # each route, forced, answers the same
        linear_mod._gemv_choice[((96, 64), False)] = pick
        before = calls["onednn"]
        torch.testing.assert_close(linear_mod.linear(x, w), F.linear(x, w))
        assert calls["onednn"] - before == int(pick)  # no new timing, only the chosen route runs


def test_engine_stats_and_env_command_report_paths(tiny_models, capsys):
    from dashinfer_core import LLM
    from dashinfer_core.cli import main
    llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", kv_cache_memory=8 << 20)
    paths = llm.engine.stats().fast_paths
    assert set(paths) == set(capabilities.FAST_PATHS)
    assert all(v.startswith(("on: ", "off: ")) for v in paths.values())
    assert main(["env", "--json", "--dtype", "bfloat16", "--quantization", "iq-int8"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["platform"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(report["cpu_paths"]) == {"bfloat16/iq-int8"}
    assert set(report["cpu_paths"]["bfloat16/iq-int8"]) == set(capabilities.FAST_PATHS)


def test_compile_cache_is_kept_per_cpu_and_isa(monkeypatch, tmp_path):
    # Inductor's cache keys miss the vector ISA: code cached under another ISA gave NaN logits here.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    folder = capabilities.isolate_compile_cache()
    assert os.path.dirname(folder) == str(tmp_path)
    assert torch.backends.cpu.get_cpu_capability().lower() in os.path.basename(folder)
    assert capabilities.isolate_compile_cache() == folder == os.environ["TORCHINDUCTOR_CACHE_DIR"]
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "SSE41" if os.environ.get("ONEDNN_MAX_CPU_ISA") == "AVX2" else "AVX2")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    assert capabilities.isolate_compile_cache() != folder


def test_importing_the_package_isolates_the_compile_cache(tmp_path):
    # Kernels compiled without the engine (QuantizedLinear in a script) must not load another ISA's code.
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path), ATEN_CPU_CAPABILITY="avx2")
    out = subprocess.run([sys.executable, "-c", "import os, dashinfer_core; print(os.environ['TORCHINDUCTOR_CACHE_DIR'])"],
                         env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert os.path.dirname(out) == str(tmp_path)
    assert os.path.basename(out).startswith("dashinfer-") and "avx2" in os.path.basename(out)
