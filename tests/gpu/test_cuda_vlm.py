"""Qwen2-VL on CUDA (run by benchmarks/gpu_check.sh): images and text in one batch, greedy in float32
against HF transformers on the same random model; no tokenizer needed (prompts as token ids)."""
from __future__ import annotations

import pytest
import torch

from dashinfer_core import LLM, SamplingParams
from helpers import Reference, compare_greedy, random_image

pytestmark = pytest.mark.gpu


def test_cuda_qwen2_vl_matches_hf(tmp_path):
    import transformers
    cfg = transformers.Qwen2VLConfig(
        text_config=dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 1e4},
                         initializer_range=0.25, eos_token_id=2, bos_token_id=1),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, initializer_range=0.25),
        image_token_id=1000, vision_start_token_id=1001, vision_end_token_id=1002, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.Qwen2VLForConditionalGeneration(cfg).save_pretrained(str(tmp_path))
    transformers.Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40).save_pretrained(str(tmp_path))
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = []
    for i, (w, h) in enumerate(((56, 56), (100, 60), (150, 120), (64, 200))):
        ids = [5 + i, 1001, 1000, 1002] + [10 + (7 * i + j) % 900 for j in range(20)]
        prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": [random_image(w, h, seed=i)]}})
    prompts += [[30 + j for j in range(25)], [40 + j for j in range(7)]]
    llm = LLM(str(tmp_path), dtype="float32", device="cuda", skip_tokenizer_init=True, max_num_batched_tokens=64)
    outs = llm.generate(prompts, params)
    hf = transformers.Qwen2VLForConditionalGeneration.from_pretrained(str(tmp_path), dtype=torch.float32).cuda().eval()
    results = []
    for prompt, out in zip(prompts, outs):
        ids = prompt if isinstance(prompt, list) else prompt["prompt_token_ids"]
        images = None if isinstance(prompt, list) else prompt["multi_modal_data"]["image"]
        request = llm.engine.build_request("ref", ids, params, images=images)
        x = torch.tensor([request.prompt_token_ids], device="cuda")
        kwargs = {}
        if request.mm is not None:
            kwargs = dict(pixel_values=torch.cat([im.pixel_values for im in request.mm.images]).cuda(),
                          image_grid_thw=torch.tensor([im.grid_thw for im in request.mm.images], device="cuda"),
                          mm_token_type_ids=(x == 1000).int())
        ref = hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=10, do_sample=False,
                          output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
        gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in ref.logits]
        results.append(compare_greedy(out.outputs[0].token_ids, Reference(ref.sequences[0, x.shape[1]:].tolist(), gaps)))
    assert "mismatch" not in results and results.count("match") >= len(results) - 1, results
