"""Greedy output is token-identical to HF transformers (fp32, CPU), with multi-block sequences,
chunked prefill and preemption all happening in the same run."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dashinfer_core import LLM, SamplingParams
from dashinfer_core.cache.kv_cache import bytes_per_block
from helpers import compare_greedy, hf_greedy, mixed_prompts

NEW_TOKENS = 24


def run_and_compare(model_dir, prompts, new_tokens, block_size, num_blocks, max_batched_tokens):
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    cfg = hf.config
    kv_bytes = num_blocks * bytes_per_block(cfg.num_hidden_layers, block_size, cfg.num_key_value_heads,
                                            getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
                                            torch.float32)
    llm = LLM(str(model_dir), dtype="float32", device="cpu", block_size=block_size, kv_cache_memory=kv_bytes,
              max_num_batched_tokens=max_batched_tokens, max_num_seqs=16, enable_prefix_caching=False)
    outs = llm.generate(prompts, SamplingParams(max_tokens=new_tokens, temperature=0.0))
    results = {"match": 0, "tie": 0, "mismatch": 0}
    details = []
    for prompt, out in zip(prompts, outs):
        ref = hf_greedy(hf, prompt, new_tokens, eos_ids=llm.engine.eos_token_ids)
        verdict = compare_greedy(out.token_ids, ref)
        results[verdict] += 1
        if verdict != "match":
            details.append((len(prompt), out.token_ids, ref.tokens))
    stats = llm.engine.stats()
    return results, details, stats, llm


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral"])
def test_tiny_models_greedy_match_hf(tiny_models, family):
    prompts = mixed_prompts(18, seed=hash(family) % 1000)
    # 16-token blocks; room for ~6 sequences at once, so 18 prompts force preemption; prefill is
    # chunked at 48 tokens per step while other sequences decode.
    results, details, stats, _ = run_and_compare(tiny_models[family], prompts, NEW_TOKENS, block_size=16,
                                                 num_blocks=40, max_batched_tokens=48)
    print(family, results, stats)
    assert stats.num_preemptions > 0, "the KV budget was meant to force preemption"
    assert stats.num_free_blocks == stats.num_blocks
    assert results["mismatch"] == 0, details
    assert results["tie"] <= 1, details


def test_embedded_model_greedy_matches_hf(default_model_dir):
    prompts = mixed_prompts(16, min_len=4, max_len=70, seed=7)
    results, details, stats, llm = run_and_compare(default_model_dir, prompts, 16, block_size=16,
                                                   num_blocks=36, max_batched_tokens=64)
    print("embedded", results, stats)
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_blocks
    assert results["mismatch"] == 0, details
    assert results["tie"] <= 1, details


def test_fp32_rmsnorm_is_hf_bit_for_bit_on_both_routes(monkeypatch):
    """torch's rms_norm where the start-up probe found it exact (it is on this torch), HF's op-by-op form
    otherwise: either way HF's LlamaRMSNorm, bit for bit, with and without the fused residual add."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from dashinfer_core.layers import norm
    assert norm.fused_rms_norm_exact()
    calls = []
    fused = norm.F.rms_norm
    monkeypatch.setattr(norm.F, "rms_norm", lambda *a, **k: calls.append(1) or fused(*a, **k))
    torch.manual_seed(5)
    for width, rows in ((64, 1), (576, 13), (960, 64)):
        ours = norm.RMSNorm(width, 1e-5, torch.float32)
        ours.weight.data.normal_()
        hf = LlamaRMSNorm(width, eps=1e-5)
        hf.weight.data.copy_(ours.weight)
        x, residual = torch.randn(rows, width) * 3, torch.randn(rows, width)
        for route_fused in (True, False):
            monkeypatch.setattr(norm, "fused_rms_norm_exact", lambda: route_fused)
            calls.clear()
            out, summed = ours(x, residual)
            assert torch.equal(summed, x + residual) and torch.equal(out, hf(x + residual))
            assert torch.equal(ours(x), hf(x))
            assert len(calls) == (2 if route_fused else 0)
