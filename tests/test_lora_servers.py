"""LoRA adapters served by name through both stacks, end to end on 127.0.0.1: FastChat's controller +
our worker (`--lora-modules sql=... chat=...`) + the OpenAI server, and the LiteLLM proxy with an
entry per adapter sharing one engine; queried with the `openai` client, answers equal to the engine
run in this process with the same adapter."""
from __future__ import annotations

import pytest
import requests

from dashinfer_core import LLM, LoRARequest, SamplingParams
from helpers import build_tiny_model, make_adapter
from servers import Process, free_port, python_module, start_litellm_proxy, wait_until

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
    env = {"LOGDIR": str(tmp_path)}
    c_port, w_port, api_port = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{c_port}"
    procs = [Process(python_module("fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(c_port)),
                     tmp_path, "controller", env)]
    try:
        wait_until(lambda: requests.get(f"{controller}/test_connection", timeout=2).ok, 60, "controller", procs)
        procs.append(Process(python_module(
            "dashinfer_fastchat.worker", "--host", "127.0.0.1", "--port", str(w_port), "--worker-address",
            f"http://127.0.0.1:{w_port}", "--controller-address", controller, "--model-path", str(base),
            "--model-names", "tiny", "--dtype", "float32", "--lora-modules",
            *(f"{name}={path}" for name, path in adapters.items())), tmp_path, "worker", env))
        procs.append(Process(python_module("dashinfer_fastchat.openai_api_server", "--host", "127.0.0.1", "--port",
                                           str(api_port), "--controller-address", controller), tmp_path, "api", env))
        api = f"http://127.0.0.1:{api_port}/v1"
        wait_until(lambda: {"tiny", "sql", "chat"} <= {m["id"] for m in requests.get(f"{api}/models", timeout=2)
                                                       .json()["data"]}, 180, "the three names to register", procs)
        _check(OpenAI(base_url=api, api_key="unused", max_retries=0, timeout=120), expected)
        stats = requests.get(f"http://127.0.0.1:{w_port}/worker_get_engine_stats", timeout=5).json()
        assert stats["num_free_blocks"] == stats["num_blocks"]
    finally:
        for p in reversed(procs):
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
