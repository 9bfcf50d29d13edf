"""The whole engine with the Triton attention backend forced on (under TRITON_INTERPRET=1 on the CPU)
gives the same greedy tokens as the torch backend, through decode, chunked prefill and preemption."""
from __future__ import annotations

import os

import pytest
import torch

from dashinfer_core import LLM, SamplingParams, layers
from dashinfer_core.cache.kv_cache import bytes_per_block
from helpers import mixed_prompts


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and os.environ.get("DASHINFER_TEST_DEVICE", "cpu") == "cpu",
                    reason="needs TRITON_INTERPRET=1 on the CPU")
def test_triton_backend_matches_torch_backend(tiny_models):
    prompts = mixed_prompts(6, min_len=3, max_len=40, seed=21)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=32,
                  kv_cache_memory=10 * bytes_per_block(2, 16, 2, 16, torch.float32))  # forces preemption
    torch_out = LLM(str(tiny_models["llama"]), attention_backend="torch", **common).generate(prompts, params)
    llm = LLM(str(tiny_models["llama"]), attention_backend="triton", **common)
    triton_out = llm.generate(prompts, params)
    assert llm.engine.runner.attention.name == "triton"
    assert llm.engine.stats().num_preemptions > 0
    assert [o.token_ids for o in triton_out] == [o.token_ids for o in torch_out]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on the CPU")
@pytest.mark.parametrize("kv_cache_dtype", ["int8", "uint4"])
def test_triton_backend_on_a_quantized_kv_cache(tiny_models, kv_cache_dtype):
    prompts = mixed_prompts(4, min_len=3, max_len=40, seed=23)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=24,
                  kv_cache_dtype=kv_cache_dtype)
    expected = LLM(str(tiny_models["qwen3"]), attention_backend="torch", **common).generate(prompts, params)
    got = LLM(str(tiny_models["qwen3"]), attention_backend="triton", **common).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in expected]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="needs TRITON_INTERPRET=1 on the CPU")
def test_fused_triton_ops_match_torch_ops(tiny_models, monkeypatch):
    """The CUDA model path (RMSNorm, rotary, SiLU-mul kernels + Triton attention) on the CPU."""
    prompts = mixed_prompts(3, min_len=3, max_len=20, seed=22)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    import dashinfer_kernels.rmsnorm as rmsnorm_kernel
    kernel_calls = []
    kernel = rmsnorm_kernel.rmsnorm
    monkeypatch.setattr(rmsnorm_kernel, "rmsnorm", lambda *a, **k: kernel_calls.append(1) or kernel(*a, **k))
    for family in ("llama", "qwen3"):
        common = dict(dtype="float32", device="cpu", block_size=16)
        expected = LLM(str(tiny_models[family]), attention_backend="torch", **common).generate(prompts, params)
        assert not kernel_calls
        monkeypatch.setattr(layers, "FORCE_TRITON_OPS", True)
        got = LLM(str(tiny_models[family]), attention_backend="triton", **common).generate(prompts, params)
        monkeypatch.setattr(layers, "FORCE_TRITON_OPS", False)
        assert kernel_calls, "the forced run did not take the Triton kernels"
        kernel_calls.clear()
        assert [o.token_ids for o in got] == [o.token_ids for o in expected], family
