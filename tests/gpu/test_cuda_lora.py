"""Multi-LoRA on CUDA (run by benchmarks/gpu_check.sh): the Triton shrink/expand path in a whole
engine, adapters and the base model mixed in one batch, greedy in float32 against HF transformers on
the model with each adapter merged into its weights (peft is not needed on the GPU machine)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dashinfer_core import LLM, LoRARequest, SamplingParams
from helpers import compare_greedy, hf_greedy, make_merged_adapter, mixed_prompts, tiny_config

pytestmark = pytest.mark.gpu


def test_cuda_lora_mixed_batch_matches_merged_models(tmp_path):
    torch.manual_seed(0)
    base = tmp_path / "base"  # no tokenizer: the GPU machine may not have the embedded model's
    AutoModelForCausalLM.from_config(tiny_config("qwen2"), dtype=torch.float32).save_pretrained(str(base))
    loras, merged = [], []
    for i, targets in enumerate((("q_proj", "v_proj"), ("k_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))):
        adapter = make_merged_adapter(base, tmp_path / f"a{i}", tmp_path / f"m{i}", rank=8 * (i + 1), seed=i,
                                      targets=targets)
        loras.append(LoRARequest(f"a{i}", i + 1, str(adapter)))
        merged.append(tmp_path / f"m{i}")
    prompts = mixed_prompts(12, max_len=80, seed=3)
    which = [None, 0, 1] * 4
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    llm = LLM(str(base), dtype="float32", device="cuda", skip_tokenizer_init=True, enable_lora=True, max_loras=2, max_lora_rank=16,
              max_num_batched_tokens=64)
    outs = llm.generate(prompts, params, lora_request=[loras[w] if w is not None else None for w in which])
    refs = {None: base, 0: merged[0], 1: merged[1]}
    models = {w: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).cuda() for w, path in refs.items()}
    results = [compare_greedy(o.outputs[0].token_ids, hf_greedy(models[w], p, 10))
               for o, p, w in zip(outs, prompts, which)]
    assert "mismatch" not in results and results.count("match") >= 11, results
