"""Images through both stacks, end to end on 127.0.0.1 with a tiny random Qwen2-VL: FastChat's
controller + our worker + our OpenAI server, and the LiteLLM proxy; a chat message with a base64
image (and text) answered as the engine in this process answers it; a text-only model refuses
images with a 400 naming them."""
from __future__ import annotations

import pytest
import requests

from dashinfer_core import LLM, SamplingParams
from helpers import build_tiny_qwen2_vl, data_url, random_image
from servers import start_fastchat_stack, start_litellm_proxy

pytestmark = pytest.mark.slow
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_model_dir):
    model = build_tiny_qwen2_vl(tmp_path_factory.mktemp("vlm-servers") / "model", default_model_dir)
    messages = []
    for i, (w, h) in enumerate(((100, 60), (64, 150))):
        url = data_url(random_image(w, h, seed=i))
        messages.append([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                      {"type": "text", "text": "What is shown here?"}]}])
    llm = LLM(str(model), dtype="float32", device="cpu")
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    expected = [out.outputs[0].text for out in llm.chat(messages, params)]
    assert expected[0] != expected[1]  # the image matters
    return model, messages, expected


def _check(client, name, messages, expected):
    for msgs, want in zip(messages, expected):
        r = client.chat.completions.create(model=name, messages=msgs, temperature=0, max_tokens=MAX_TOKENS,
                                           extra_body={"ignore_eos": True})
        assert r.choices[0].message.content == want


def test_fastchat_stack_answers_a_base64_image(setup, tmp_path):
    from openai import OpenAI
    model, messages, expected = setup
    stack = start_fastchat_stack(tmp_path, ["--model-path", str(model), "--model-names", "tiny-vl", "--dtype",
                                            "float32", "--max-model-len", "1024"], {"tiny-vl"})
    try:
        # (a text-only model's refusal of images: test_fastchat_worker.py, on its shared stack)
        _check(OpenAI(base_url=stack["api"], api_key="unused", max_retries=0, timeout=120), "tiny-vl", messages,
               expected)
        stats = requests.get(f"{stack['worker']}/worker_get_engine_stats", timeout=5).json()
        assert stats["num_free_blocks"] == stats["num_blocks"]
    finally:
        for p in reversed(stack["procs"]):
            p.stop()


def test_litellm_proxy_answers_a_base64_image(setup, tmp_path):
    from openai import BadRequestError, OpenAI
    model, messages, expected = setup
    config = (f"model_list:\n  - model_name: tiny-vl\n    litellm_params: {{model: dashinfer/{model}, dtype: float32}}\n"
              "  - model_name: smollm2\n    litellm_params: {model: dashinfer/default, dtype: float32}\n"
              "litellm_settings:\n  custom_provider_map:\n"
              "    - {provider: dashinfer, custom_handler: dashinfer_litellm.handler}\n")
    proxy = start_litellm_proxy(tmp_path, config)
    try:
        client = OpenAI(base_url=f"{proxy['base']}/v1", api_key=proxy["key"], max_retries=0, timeout=300)
        _check(client, "tiny-vl", messages, expected)
        with pytest.raises(BadRequestError) as err:
            client.chat.completions.create(model="smollm2", messages=messages[0], max_tokens=4)
        assert "images" in str(err.value)
    finally:
        proxy["proc"].stop()
