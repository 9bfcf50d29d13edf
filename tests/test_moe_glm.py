"""Mixture-of-experts (Qwen2-MoE with its shared expert and a dense layer, Qwen3-MoE with top-8 of 8,
Mixtral with top-1) and the GLM family (partial interleaved rotary, merged gate/up; GLM-4's extra
post-norms): tiny random models saved by transformers, loaded through the normal loader, greedy output
token-identical to HF transformers fp32 with preemption and chunked prefill."""
from __future__ import annotations

import json

import pytest
import torch

from dashinfer_core import LLM, SamplingParams, UnsupportedModelError, layers
from dashinfer_core.cache.kv_cache import bytes_per_block
from helpers import build_tiny_model, compare_greedy, hf_greedy, mixed_prompts

FAMILIES = ("qwen2_moe", "qwen3_moe", "mixtral", "glm", "glm4")
HEAD_DIM = {"qwen3_moe": 32, "glm4": 32}


@pytest.fixture(scope="module")
def models(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("moe-glm")
    return {f: build_tiny_model(f, root / f, default_model_dir) for f in FAMILIES}


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_hf_with_preemption_and_chunked_prefill(models, family):
    from transformers import AutoModelForCausalLM
    prompts = mixed_prompts(16, max_len=90, seed=1)
    kv = 20 * bytes_per_block(2, 16, 2, HEAD_DIM.get(family, 16), torch.float32)  # 20 blocks: preemption
    llm = LLM(str(models[family]), dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=48,
              kv_cache_memory=kv)
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_blocks
    hf = AutoModelForCausalLM.from_pretrained(str(models[family]), dtype=torch.float32)
    results = [compare_greedy(o.outputs[0].token_ids, hf_greedy(hf, p, 12)) for o, p in zip(outs, prompts)]
    assert "mismatch" not in results and results.count("match") >= 14, results


def test_moe_block_matches_a_per_token_reference(models):
    """The sorted dispatch (one matmul per active expert) against routing each token on its own."""
    llm = LLM(str(models["qwen2_moe"]), dtype="float32", device="cpu")
    block = llm.engine.runner.model.layers[1].mlp  # layer 0 is dense (mlp_only_layers)
    assert type(block).__name__ == "MoE" and type(llm.engine.runner.model.layers[0].mlp).__name__ == "MLP"
    x = torch.randn(37, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = block(x)
        probs = torch.softmax(block.gate(x), dim=-1)
        want = torch.empty_like(x)
        for t in range(x.shape[0]):
            weights, experts = probs[t].topk(block.top_k)
            want[t] = sum(w * block.experts[int(e)](x[t:t + 1])[0] for w, e in zip(weights, experts))
            want[t] += torch.sigmoid(block.shared_expert_gate(x[t:t + 1]))[0] * block.shared_expert(x[t:t + 1])[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["iq-int8", "a8w8"])
def test_quantized_moe_keeps_the_router_and_follows_the_float_model(models, quantization):
    """int8 experts stay close to the float model (11-13 of 16 here; garbage would share ~0). iq-int4
    is left to the embedded-model test: on these random weights even a dense model's int4 diverges."""
    from dashinfer_core.quant.linear import QuantizedLinear
    prompts = mixed_prompts(16, max_len=60, seed=2)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    exact = LLM(str(models["mixtral"]), dtype="float32", device="cpu").generate(prompts, params)
    quant = LLM(str(models["mixtral"]), dtype="float32", device="cpu", quantization=quantization)
    block = quant.engine.runner.model.layers[0].mlp
    assert isinstance(block.experts[0].gate_up_proj, QuantizedLinear) and block.w13 is None
    assert not isinstance(block.gate, QuantizedLinear)  # routing stays in full precision
    got = quant.generate(prompts, params)
    same_first = sum(a.outputs[0].token_ids[:3] == b.outputs[0].token_ids[:3] for a, b in zip(exact, got))
    assert same_first >= 8, same_first


def test_moe_under_tensor_parallel_equals_one_rank(models):
    prompts = mixed_prompts(8, max_len=50, seed=4)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", device="cpu", block_size=16)
    want = LLM(str(models["qwen2_moe"]), **common).generate(prompts, params)
    two = LLM(str(models["qwen2_moe"]), tensor_parallel_size=2, **common)
    try:
        got = two.generate(prompts, params)
    finally:
        two.shutdown()
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]


@pytest.mark.parametrize("family,field,value", [("qwen2_moe", "decoder_sparse_step", 0),
                                                ("qwen3_moe", "scoring_func", "sigmoid"),
                                                ("mixtral", "num_experts_per_tok", 9)])
def test_config_variants_the_engine_cannot_run_are_refused(models, tmp_path, family, field, value):
    import shutil
    path = tmp_path / family
    shutil.copytree(models[family], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg[field] = value
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match=field):
        LLM(str(path), device="cpu")


def test_fused_moe_kernel_in_the_engine_matches_the_torch_dispatch(models, monkeypatch):
    """The Triton fused-MoE path (CUDA's), interpreted on the CPU, against the sorted torch dispatch."""
    prompts = mixed_prompts(6, max_len=40, seed=8)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = LLM(str(models["qwen2_moe"]), dtype="float32", device="cpu").generate(prompts, params)
    import dashinfer_kernels.fused_moe as fused_moe_kernel
    kernel_calls = []
    kernel = fused_moe_kernel.fused_moe
    monkeypatch.setattr(fused_moe_kernel, "fused_moe", lambda *a, **k: kernel_calls.append(1) or kernel(*a, **k))
    monkeypatch.setattr(layers, "FORCE_TRITON_OPS", True)
    fused = LLM(str(models["qwen2_moe"]), dtype="float32", device="cpu")
    assert fused.engine.runner.model.layers[1].mlp.w13 is not None
    got = fused.generate(prompts, params)
    assert kernel_calls, "the forced run did not take the fused kernel"
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
