"""LoRA adapters served by name through both stacks, end to end on 127.0.0.1: FastChat's controller +
our worker (`--lora-modules sql=... chat=...`) + the OpenAI server, and the LiteLLM proxy with an
entry per adapter sharing one engine; queried with the `openai` client, answers equal to the engine
run in this process with the same adapter."""
from __future__ import annotations

import pytest
import requests

from dashinfer_core import LLM, LoRARequest, SamplingParams
from helpers import build_tiny_model, make_adapter
from servers import start_fastchat_stack, start_litellm_proxy

pytestmark = pytest.mark.slow
PROMPTS = ["The weather today is", "Once upon a time"]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def models(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("lora-servers")
    base = build_tiny_model("llama", root / "base", default_model_dir)
    sql = make_adapter(base, root / "sql", 1, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    chat = make_adapter(base, root / "chat", 2, r=4, lora_alpha=8, target_modules=["o_proj", "gate_proj"])
    return root, base, {"sql": str(sql), "chat": str(chat)}


@pytest.fixture(scope="module")
def expected(models):
    """name ('tiny' = the base model) -> the greedy completion of each prompt, from this process."""
    _, base, adapters = models
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    out = {"tiny": [o.outputs[0].text for o in llm.generate(PROMPTS, params)]}
    for i, (name, path) in enumerate(adapters.items()):
        lora = LoRARequest(name, i + 1, path)
        out[name] = [o.outputs[0].text for o in llm.generate(PROMPTS, params, lora_request=lora)]
    assert len({tuple(v) for v in out.values()}) == 3  # the adapters change the answers
    return out


def _check(client, expected):
    for name, texts in expected.items():
        for prompt, want in zip(PROMPTS, texts):
            r = client.completions.create(model=name, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                          extra_body={"ignore_eos": True})
            assert r.choices[0].text == want, (name, prompt)


def test_fastchat_worker_serves_adapters_by_name(models, expected, tmp_path):
    from openai import OpenAI
    _, base, adapters = models
    stack = start_fastchat_stack(tmp_path, ["--model-path", str(base), "--model-names", "tiny", "--dtype", "float32",
                                            "--lora-modules", *(f"{name}={path}" for name, path in adapters.items())],
                                 {"tiny", "sql", "chat"})
    try:
        _check(OpenAI(base_url=stack["api"], api_key="unused", max_retries=0, timeout=120), expected)
        stats = requests.get(f"{stack['worker']}/worker_get_engine_stats", timeout=5).json()
        assert stats["num_free_blocks"] == stats["num_blocks"]
    finally:
        for p in reversed(stack["procs"]):
            p.stop()


def test_litellm_proxy_serves_an_entry_per_adapter_on_one_engine(models, expected, tmp_path):
    from openai import OpenAI
    _, base, adapters = models
    entries = [f"  - model_name: tiny\n    litellm_params: {{model: dashinfer/{base}, dtype: float32, "
               f"enable_lora: true}}\n"]
    for name, path in adapters.items():
        entries.append(f"  - model_name: {name}\n    litellm_params: {{model: dashinfer/{base}, dtype: float32, "
                       f"lora: {{name: {name}, path: {path}}}}}\n")
    config = ("model_list:\n" + "".join(entries) + "litellm_settings:\n  custom_provider_map:\n"
              "    - {provider: dashinfer, custom_handler: dashinfer_litellm.handler}\n")
    proxy = start_litellm_proxy(tmp_path, config)
    try:
        _check(OpenAI(base_url=f"{proxy['base']}/v1", api_key=proxy["key"], max_retries=0, timeout=300), expected)
        stats = requests.get(proxy["stats"], timeout=5).json()
        assert len(stats) == 1, list(stats)  # base and both adapters on one engine
    finally:
        proxy["proc"].stop()
