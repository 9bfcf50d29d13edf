"""LiteLLM provider: the real proxy (`litellm --config`) on 127.0.0.1 with the engine inside it,
queried with the `openai` client; and the SDK path in-process. Nothing mocked."""
from __future__ import annotations

import asyncio
import os

import httpx
import pytest
import requests

from servers import start_litellm_proxy, wait_until

pytestmark = pytest.mark.slow
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
CONFIG = """model_list:
  - model_name: smollm2
    litellm_params: {model: dashinfer/default, max_num_seqs: 32, additional_drop_params: [encoding_format]}
  - model_name: tiny-thinker
    litellm_params: {model: "dashinfer/THINKER_DIR"}
litellm_settings:
  custom_provider_map:
    - {provider: dashinfer, custom_handler: dashinfer_litellm.handler}
"""


@pytest.fixture(scope="module")
def proxy(tmp_path_factory, default_model_dir):
    from helpers import build_tiny_thinker  # a reasoning model beside it
    log_dir = tmp_path_factory.mktemp("litellm-proxy")
    thinker = build_tiny_thinker(log_dir / "tiny-thinker", default_model_dir)
    proxy = start_litellm_proxy(log_dir, CONFIG.replace("THINKER_DIR", str(thinker)))
    yield proxy
    proxy["proc"].stop()


@pytest.fixture(scope="module")
def client(proxy):
    from openai import OpenAI
    return OpenAI(base_url=f"{proxy['base']}/v1", api_key=proxy["key"], max_retries=0, timeout=300)


def chat(client, messages=CAPITAL, **kw):
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="smollm2", messages=messages, **kw)


def engine(proxy):
    stats = requests.get(proxy["stats"], timeout=5).json()
    return next(v for k, v in stats.items() if k.startswith("default"))  # smollm2's engine


def test_chat_text_and_streaming(client):
    r = chat(client, max_tokens=32)
    assert r.choices[0].message.content == "The capital of France is Paris."
    assert r.choices[0].finish_reason == "stop" and r.usage.prompt_tokens == 37
    stream = chat(client, max_tokens=32, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
    text = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0, max_tokens=8)
    assert text.choices[0].text.startswith(" Paris")


def test_n_stop_and_seed(client):
    two = chat(client, max_tokens=16, n=2)
    assert [c.message.content for c in two.choices] == ["The capital of France is Paris."] * 2
    assert chat(client, max_tokens=32, stop=["Paris"]).choices[0].message.content == "The capital of France is "
    story = [{"role": "user", "content": "Tell me a story."}]
    a = chat(client, story, temperature=1.0, seed=5, max_tokens=24).choices[0].message.content
    b = chat(client, story, temperature=1.0, seed=5, max_tokens=24).choices[0].message.content
    c = chat(client, story, temperature=1.0, seed=6, max_tokens=24).choices[0].message.content
    assert a == b and a != c


def test_errors_have_the_right_status(client, proxy):
    from openai import BadRequestError
    with pytest.raises(BadRequestError) as err:
        chat(client, temperature=-1)
    assert err.value.status_code == 400 and "temperature" in str(err.value)
    with pytest.raises(BadRequestError) as err:
        chat(client, [{"role": "user", "content": "word " * 9000}], max_tokens=4)
    assert err.value.status_code == 400 and "maximum context length" in str(err.value)
    # The same errors on a stream come back as HTTP 400, not as a broken 200 stream.
    r = requests.post(f"{proxy['base']}/v1/chat/completions", headers={"Authorization": f"Bearer {proxy['key']}"},
                      json={"model": "smollm2", "messages": CAPITAL, "temperature": -1, "stream": True}, timeout=60)
    assert r.status_code == 400, r.text
    assert chat(client, max_tokens=4).choices[0].message.content  # still serving


def test_16_concurrent_streams_match_single_requests(proxy):
    prompts = [[{"role": "user", "content": f"Name a fruit and a number ({i})."}] for i in range(16)]
    headers = {"Authorization": f"Bearer {proxy['key']}"}

    async def stream_one(client, messages):
        import json
        text = ""
        body = {"model": "smollm2", "messages": messages, "temperature": 0, "max_tokens": 20, "stream": True}
        async with client.stream("POST", f"{proxy['base']}/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choices = json.loads(line[6:])["choices"]
                    if choices:
                        text += choices[0]["delta"].get("content") or ""
        return text

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            together = await asyncio.gather(*(stream_one(client, p) for p in prompts))
            alone = [await stream_one(client, p) for p in prompts]
        return together, alone

    together, alone = asyncio.run(main())
    assert together == alone and all(together)


def test_aborted_stream_frees_blocks(proxy):
    headers = {"Authorization": f"Bearer {proxy['key']}"}
    body = {"model": "smollm2", "messages": [{"role": "user", "content": "Write a very long essay about rivers."}],
            "temperature": 0.8, "max_tokens": 800, "stream": True}
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", f"{proxy['base']}/v1/chat/completions", json=body, headers=headers) as r:
            lines = r.iter_lines()
            for _ in range(5):
                next(lines)
            assert engine(proxy)["num_running"] >= 1
    stats = wait_until(lambda: (s := engine(proxy))["num_requests"] == 0 and s, 30, "the aborted request to end")
    assert stats["num_free_blocks"] == stats["num_blocks"]


def test_sdk_in_process(default_model_dir):
    import litellm

    import dashinfer_litellm
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    dashinfer_litellm.register()
    r = litellm.completion(model="dashinfer/default", messages=CAPITAL, temperature=0, max_tokens=32)
    assert r.choices[0].message.content == "The capital of France is Paris."
    stream = litellm.completion(model="dashinfer/default", messages=CAPITAL, temperature=0, max_tokens=32,
                                stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream) == "The capital of France is Paris."

    async def main():
        r = await litellm.acompletion(model="dashinfer/default", messages=CAPITAL, temperature=0, max_tokens=32,
                                      response_format={"type": "json_object"})
        s = await litellm.acompletion(model="dashinfer/default", messages=CAPITAL, temperature=0, max_tokens=32,
                                      stream=True)
        return r, "".join([c.choices[0].delta.content or "" async for c in s])

    r, streamed = asyncio.run(main())
    import json
    assert isinstance(json.loads(r.choices[0].message.content), dict)
    assert streamed == "The capital of France is Paris."
    with pytest.raises(litellm.BadRequestError):
        litellm.completion(model="dashinfer/default", messages=CAPITAL, top_p=0)


def test_response_format_and_guided_fields_reach_the_engine(client):
    from test_openai_fields import check_guided_fields
    check_guided_fields(client, "smollm2")


def test_fields_the_provider_cannot_honour_answer_400(client):
    from test_openai_fields import check_refused_fields, common_refusals
    check_refused_fields(client, "smollm2", common_refusals())
    # stream_options.include_usage is honoured: LiteLLM sends the usage the provider reports.
    chunks = list(chat(client, max_tokens=4, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4


def test_tool_calls_and_stream_usage(client):
    from test_openai_fields import check_include_usage, check_tool_calls
    check_tool_calls(client, "smollm2")
    check_include_usage(client, "smollm2")


def test_reasoning_content(client):
    from test_openai_fields import check_reasoning
    check_reasoning(client, "tiny-thinker")


def test_embeddings(client):
    from dashinfer_core import LLM
    from test_openai_fields import EMBED_TEXTS, check_embeddings
    local = LLM(dtype="float32")
    try:
        reference = local.embed(EMBED_TEXTS)
    finally:
        local.shutdown()
    check_embeddings(client, "smollm2", reference, base64_honoured=False)


def test_metrics(client, proxy):
    from test_openai_fields import check_metrics
    chat(client, max_tokens=1)  # the engine starts with its first request
    label = next(k for k in requests.get(proxy["stats"], timeout=5).json() if k.startswith("default"))
    check_metrics(lambda: requests.get(f"{proxy['stats']}/metrics", timeout=10).text, client, "smollm2", label)


def test_health_check_answers_quickly(proxy):
    """LiteLLM's /health probes every model entry with a short completion: ours answer healthy, without a
    long generation."""
    from test_openai_fields import metric_samples
    headers = {"Authorization": f"Bearer {proxy['key']}"}

    def health():
        r = requests.get(f"{proxy['base']}/health", headers=headers, timeout=120)
        body = r.json()
        assert r.status_code == 200 and not body["unhealthy_endpoints"], body
        assert {e["model"] for e in body["healthy_endpoints"]} >= {"dashinfer/default"}, body

    health()  # starts the engines of entries no request has used yet
    label = next(k for k in requests.get(proxy["stats"], timeout=5).json() if k.startswith("default"))
    before = metric_samples(requests.get(f"{proxy['stats']}/metrics", timeout=10).text, label)
    health()
    after = metric_samples(requests.get(f"{proxy['stats']}/metrics", timeout=10).text, label)
    generated = after["dashinfer:generation_tokens_total"] - before["dashinfer:generation_tokens_total"]
    assert 1 <= generated <= 16, generated
