"""Vision-language models: a tiny random Qwen2-VL (SmolLM2's tokenizer with Qwen2-VL's image tokens and
chat template added, a small image-processor config) saved by transformers and loaded through the
normal loader; greedy output token-identical to HF transformers fp32 for (image, question) pairs of
different image sizes submitted together with text-only requests, under chunked prefill and
preemption; encoder-cache and prefix-cache hits; the bad-image table."""
from __future__ import annotations

import pytest
import torch

from dashinfer_core import LLM, InvalidParameterError, SamplingParams
from dashinfer_core.cache.kv_cache import bytes_per_block
from helpers import Reference, build_tiny_qwen2_vl, compare_greedy, data_url, mixed_prompts, random_image

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl"])
def vl_model(request, tmp_path_factory, default_model_dir):
    return build_tiny_qwen2_vl(tmp_path_factory.mktemp(request.param) / "model", default_model_dir, request.param)


@pytest.fixture(scope="module")
def hf_model(vl_model):
    from transformers import AutoModelForImageTextToText
    return AutoModelForImageTextToText.from_pretrained(str(vl_model), dtype=torch.float32).eval()


def hf_reference(hf, engine, request):
    """HF generate on the same expanded prompt, pixels and grids the engine built for `request`."""
    ids = torch.tensor([request.prompt_token_ids])
    kwargs = {}
    if request.mm is not None:
        kwargs = dict(pixel_values=torch.cat([im.pixel_values for im in request.mm.images]),
                      image_grid_thw=torch.tensor([im.grid_thw for im in request.mm.images]),
                      mm_token_type_ids=(ids == engine.images.image_token_id).int())
    out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=PARAMS.max_tokens,
                      do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    gaps = [float(step[0].topk(2).values[0] - step[0].topk(2).values[1]) for step in out.logits]
    return Reference(out.sequences[0, ids.shape[1]:].tolist(), gaps)


QUESTIONS = ["What is in this picture?", "Describe the colours.", "How many objects are there?", "Is it day?"]
SIZES = [(56, 56), (100, 60), (150, 120), (64, 200), (90, 90), (200, 150), (30, 80), (120, 45)]


def image_conversations():
    convs = []
    for i, (w, h) in enumerate(SIZES):
        image = random_image(w, h, seed=i)
        part = {"type": "image_url", "image_url": {"url": data_url(image)}} if i % 2 else {"type": "image",
                                                                                          "image": image}
        convs.append([{"role": "user", "content": [part, {"type": "text", "text": QUESTIONS[i % 4]}]}])
    # one with two images
    convs.append([{"role": "user", "content": [{"type": "image", "image": random_image(60, 60, 20)},
                                               {"type": "text", "text": "and"},
                                               {"type": "image", "image": random_image(84, 56, 21)},
                                               {"type": "text", "text": "Compare them."}]}])
    return convs


def test_images_and_text_match_hf_under_chunked_prefill_and_preemption(vl_model, hf_model):
    kv = 14 * bytes_per_block(2, 16, 2, 16, torch.float32)  # 14 blocks of 16 tokens: preemption
    llm = LLM(str(vl_model), dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=40,
              kv_cache_memory=kv)
    convs = image_conversations()
    text_prompts = mixed_prompts(6, vocab=49152, max_len=60, seed=3)
    outs_chat = llm.chat(convs, PARAMS)
    # the same image requests again, mixed with text-only ones in one batch
    engine = llm.engine
    tok = engine.tokenizer
    from dashinfer_core.llm import apply_chat_template, conversation_images
    prompts = [{"prompt_token_ids": apply_chat_template(tok, c), "multi_modal_data": {"image": conversation_images(c)}}
               for c in convs] + text_prompts
    outs = llm.generate(prompts, PARAMS)
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_blocks
    assert [o.outputs[0].token_ids for o in outs[:len(convs)]] == [o.outputs[0].token_ids for o in outs_chat]
    assert engine.encoder_cache.hits >= len(SIZES)  # the second round encoded nothing again
    results = []
    for prompt, out in zip(prompts, outs):
        p = prompt if isinstance(prompt, list) else prompt["prompt_token_ids"]
        images = None if isinstance(prompt, list) else prompt["multi_modal_data"]["image"]
        request = engine.build_request("ref", p, PARAMS, images=images)
        results.append(compare_greedy(out.outputs[0].token_ids, hf_reference(hf_model, engine, request)))
    assert "mismatch" not in results and results.count("match") >= len(results) - 1, results
    # the images matter: the same question on two different images answers differently
    assert len({tuple(o.outputs[0].token_ids) for o in outs[:len(SIZES)]}) > 1


def test_prefix_cache_keys_blocks_by_image(vl_model):
    llm = LLM(str(vl_model), dtype="float32", device="cpu", block_size=16)
    question = {"type": "text", "text": "What is in this picture? Answer in detail, please."}

    def ask(image):
        return llm.chat([{"role": "user", "content": [{"type": "image", "image": image}, question]}],
                        PARAMS)[0]

    a, b = random_image(100, 100, 1), random_image(100, 100, 2)
    first = ask(a)
    other = ask(b)  # same tokens (the placeholders look alike), another image: no hit
    assert other.num_cached_tokens == 0 and other.outputs[0].token_ids != first.outputs[0].token_ids
    again = ask(a)
    assert again.num_cached_tokens > 0 and again.outputs[0].token_ids == first.outputs[0].token_ids


def test_text_only_model_refuses_images(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu")
    with pytest.raises(InvalidParameterError) as err:
        llm.generate({"prompt": "hi", "multi_modal_data": {"image": random_image(40, 40, 0)}}, PARAMS)
    assert err.value.field == "images"


def test_bad_images_are_refused_by_field(vl_model, tmp_path):
    llm = LLM(str(vl_model), dtype="float32", device="cpu", limit_images_per_prompt=2, max_image_pixels=300 * 300)
    (tmp_path / "not.png").write_bytes(b"this is not an image")
    cases = {
        "not an image": ([str(tmp_path / "not.png")], "images[0]", "not a readable image"),
        "bad base64": (["data:image/png;base64,@@@"], "images[0]", "base64"),
        "too many pixels": ([random_image(400, 300, 0)], "images[0]", "more than the limit"),
        "remote url": (["https://example.com/cat.png"], "images[0]", "remote image URLs are refused"),
        "too many images": ([random_image(40, 40, i) for i in range(3)], "images", "at most 2 images"),
    }
    for case, (images, field, words) in cases.items():
        content = [{"type": "image", "image": im} for im in images] + [{"type": "text", "text": "?"}]
        with pytest.raises(InvalidParameterError) as err:
            llm.chat([{"role": "user", "content": content}], PARAMS)
        assert err.value.field == field and words in str(err.value), (case, str(err.value))
    with pytest.raises(InvalidParameterError) as err:
        llm.chat([{"role": "user", "content": [{"type": "video", "video": "x"}]}], PARAMS)
    assert err.value.field == "messages[0].content[0].type"
    assert not llm.engine.requests and llm.engine.stats().num_free_blocks == llm.engine.stats().num_blocks


def test_images_under_tensor_parallel_equal_one_rank(vl_model):
    convs = image_conversations()[:4]
    want = [o.outputs[0].token_ids for o in LLM(str(vl_model), dtype="float32", device="cpu").chat(convs, PARAMS)]
    two = LLM(str(vl_model), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        assert [o.outputs[0].token_ids for o in two.chat(convs, PARAMS)] == want
    finally:
        two.shutdown()


def test_vision_tower_matches_transformers(vl_model):
    """Our vision tower against transformers' (the reference) on images of several sizes at once,
    Qwen2.5-VL's windows included (some images span several windows, cut at their edges)."""
    import transformers
    llm = LLM(str(vl_model), dtype="float32", device="cpu")
    ours = llm.engine.runner.model
    ref = transformers.AutoModelForImageTextToText.from_pretrained(str(vl_model), dtype=torch.float32).eval()
    processor = llm.engine.images.processor
    batch = [processor(images=[random_image(w, h, seed=i)], return_tensors="pt") for i, (w, h) in enumerate(SIZES)]
    pixels = torch.cat([b["pixel_values"] for b in batch])
    grid = torch.cat([b["image_grid_thw"] for b in batch])
    with torch.no_grad():
        want = ref.model.visual(pixels, grid_thw=grid).pooler_output
        got = ours.encode_images(pixels, grid)
    # fp32 sums in another order (a linear for HF's Conv3d, our attention split): ~1e-5 apart, not more
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
