"""CUDA engine checks (run by benchmarks/gpu_check.sh): greedy-exact against HF transformers in
float32 on a random-weight ~0.5B Qwen2-style model built from a config, bfloat16 within tolerance
on logits, and CUDA graphs identical to eager."""
from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from dashinfer_core import LLM, SamplingParams
from helpers import compare_greedy, hf_greedy

pytestmark = pytest.mark.gpu


def build_qwen2_half_b(path):
    from transformers import Qwen2Config
    cfg = Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, initializer_range=0.05, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.2)
    model.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return build_qwen2_half_b(tmp_path_factory.mktemp("qwen2-0.5b"))


def prompts(count, seed=0, low=16, high=300):
    rng = random.Random(seed)
    return [[rng.randrange(100, 150000) for _ in range(rng.randint(low, high))] for _ in range(count)]


def test_fp32_greedy_matches_hf(qwen_dir):
    hf = AutoModelForCausalLM.from_pretrained(str(qwen_dir), dtype=torch.float32).cuda().eval()
    batch = prompts(8, seed=1)
    llm = LLM(str(qwen_dir), dtype="float32", device="cuda", skip_tokenizer_init=True, block_size=16,
              max_num_batched_tokens=256, max_num_seqs=8, kv_cache_memory=2 << 30)
    outs = llm.generate(batch, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    verdicts = []
    for prompt, out in zip(batch, outs):
        ref = hf_greedy(hf, prompt, 24, eos_ids=())
        verdicts.append(compare_greedy(out.token_ids, ref))
    print("fp32 verdicts", verdicts)
    assert verdicts.count("mismatch") == 0 and verdicts.count("tie") <= 1, verdicts


def test_bf16_logprobs_as_close_to_fp32_as_hf_bf16(qwen_dir):
    """bf16 rounding flips near-ties, so compare logits rather than tokens: teacher-forced on our
    greedy tokens, our bf16 log-probs must sit as close to HF's float32 ones as HF's own bf16 do."""
    hf32 = AutoModelForCausalLM.from_pretrained(str(qwen_dir), dtype=torch.float32).cuda().eval()
    hf16 = AutoModelForCausalLM.from_pretrained(str(qwen_dir), dtype=torch.bfloat16).cuda().eval()
    batch = prompts(6, seed=2)
    llm = LLM(str(qwen_dir), dtype="bfloat16", device="cuda", skip_tokenizer_init=True, max_num_seqs=8,
              kv_cache_memory=2 << 30)
    outs = llm.generate(batch, SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True, logprobs=10))
    ours_err, hf_err, argmax_same = [], [], 0
    for prompt, out in zip(batch, outs):
        ids = torch.tensor([prompt + out.token_ids], device="cuda")
        with torch.no_grad():
            lp32 = torch.log_softmax(hf32(ids).logits[0, len(prompt) - 1:-1].float(), dim=-1)
            lp16 = torch.log_softmax(hf16(ids).logits[0, len(prompt) - 1:-1].float(), dim=-1)
        argmax_same += int((lp16.argmax(-1).cpu() == torch.tensor(out.token_ids)).sum())
        for i, entry in enumerate(out.outputs[0].logprobs):
            toks = torch.tensor(list(entry.keys()), device="cuda")
            ours = torch.tensor(list(entry.values()), device="cuda")
            ours_err.append((ours - lp32[i, toks]).abs().max().item())
            hf_err.append((lp16[i, toks] - lp32[i, toks]).abs().max().item())
    ours_mean, hf_mean = sum(ours_err) / len(ours_err), sum(hf_err) / len(hf_err)
    print(f"bf16 vs fp32 logprob error: ours mean {ours_mean:.4f} max {max(ours_err):.4f}; "
          f"HF bf16 mean {hf_mean:.4f} max {max(hf_err):.4f}; our greedy pick = HF bf16 argmax on "
          f"{argmax_same}/{len(ours_err)} steps")
    assert ours_mean <= 2 * hf_mean + 1e-3


def test_cuda_graphs_equal_eager(qwen_dir):
    # 16 prompts: every decode step runs 16 rows, a captured size, so graph and eager GEMMs match.
    batch = prompts(16, seed=3, low=5, high=60)
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    common = dict(dtype="bfloat16", device="cuda", skip_tokenizer_init=True, max_num_seqs=32,
                  kv_cache_memory=1 << 30)
    graphs = LLM(str(qwen_dir), **common)
    assert graphs.engine.runner.graphs is not None
    eager = LLM(str(qwen_dir), enforce_eager=True, **common)
    assert [o.token_ids for o in graphs.generate(batch, params)] == [o.token_ids for o in eager.generate(batch, params)]
    stats = graphs.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="tensor parallel over NCCL needs two GPUs; "
                    "a one-GPU machine runs TP=1 only (the CPU suite runs TP=2 over gloo)")
def test_tensor_parallel_two_gpus_equals_one(qwen_dir):
    batch = prompts(8, seed=5, low=5, high=60)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", device="cuda", skip_tokenizer_init=True, kv_cache_memory=1 << 30)
    one = [o.token_ids for o in LLM(str(qwen_dir), **common).generate(batch, params)]
    two_llm = LLM(str(qwen_dir), tensor_parallel_size=2, **common)
    try:
        assert [o.token_ids for o in two_llm.generate(batch, params)] == one
    finally:
        two_llm.shutdown()
