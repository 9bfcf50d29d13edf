"""FastChat stack end to end: FastChat's controller, our worker and our launcher of FastChat's OpenAI
server as real processes on 127.0.0.1, queried with the `openai` client. Nothing mocked."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import httpx
import pytest
import requests

from dashinfer_core import LLM, SamplingParams
from servers import Process, free_port, python_module, wait_until

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
THINKER = "tiny-thinker"
CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
FAST_HEARTBEATS = {"FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": "6", "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "2"}


def start_worker(log_dir, controller, name, extra=()):
    port = free_port()
    proc = Process(python_module("dashinfer_fastchat.worker", "--host", "127.0.0.1", "--port", str(port),
                                 "--worker-address", f"http://127.0.0.1:{port}", "--controller-address", controller,
                                 "--max-model-len", "1024", *extra),
                   log_dir, name, env={"LOGDIR": str(log_dir), **FAST_HEARTBEATS})
    return proc, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="module")
def stack(tmp_path_factory, default_model_dir):
    log_dir = tmp_path_factory.mktemp("fastchat-stack")
    env = {"LOGDIR": str(log_dir), **FAST_HEARTBEATS}
    c_port, api_port = free_port(), free_port()
    controller = f"http://127.0.0.1:{c_port}"
    procs = [Process(python_module("fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(c_port)),
                     log_dir, "controller", env)]
    wait_until(lambda: requests.get(f"{controller}/test_connection", timeout=2).ok, 60, "controller", procs)
    worker, worker_url = start_worker(log_dir, controller, "worker-a")
    procs.append(worker)
    from helpers import build_tiny_thinker  # a reasoning model beside it, under its own name
    thinker = build_tiny_thinker(log_dir / "tiny-thinker", default_model_dir)
    procs.append(start_worker(log_dir, controller, "worker-thinker",
                              ("--model-path", str(thinker), "--model-names", THINKER))[0])
    procs.append(Process(python_module("dashinfer_fastchat.openai_api_server", "--host", "127.0.0.1", "--port",
                                       str(api_port), "--controller-address", controller), log_dir, "api", env))
    api = f"http://127.0.0.1:{api_port}/v1"
    wait_until(lambda: {MODEL, THINKER} <= {m["id"] for m in requests.get(f"{api}/models", timeout=2).json()["data"]},
               180, "the models to register", procs)
    state = {"api": api, "controller": controller, "worker": worker_url, "log_dir": log_dir, "procs": procs}
    yield state
    for p in reversed(state["procs"]):
        p.stop()


@pytest.fixture(scope="module")
def client(stack):
    from openai import OpenAI
    return OpenAI(base_url=stack["api"], api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(default_model_dir):
    return LLM(dtype="float32", device="cpu")


def chat(client, messages, **kw):
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def test_chat_and_completion_match_the_engine(client, local):
    r = chat(client, CAPITAL, max_tokens=32)
    assert r.choices[0].message.content == local.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0))[0].text
    assert r.choices[0].finish_reason == "stop"
    assert r.usage.prompt_tokens == 37 and r.usage.completion_tokens > 0
    # OpenAI's text parts: the same prompt as the string
    parts = chat(client, [{"role": "user", "content": [{"type": "text", "text": CAPITAL[0]["content"]}]}],
                 max_tokens=32)
    assert parts.choices[0].message.content == r.choices[0].message.content and parts.usage.prompt_tokens == 37
    c = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=12)
    assert c.choices[0].text == local.generate("The capital of France is",
                                               SamplingParams(max_tokens=12, temperature=0))[0].text
    # n choices: the prompt counted once, the completions of every choice
    three = client.completions.create(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=4,
                                      n=3)
    assert three.usage.prompt_tokens == c.usage.prompt_tokens and 3 <= three.usage.completion_tokens <= 12
    assert three.usage.total_tokens == c.usage.prompt_tokens + three.usage.completion_tokens


def test_streaming_equals_non_streamed(client):
    full = chat(client, CAPITAL, max_tokens=32).choices[0].message.content
    stream = chat(client, CAPITAL, max_tokens=32, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in stream if ch.choices) == full
    text = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=20).choices[0].text
    stream = client.completions.create(model=MODEL, prompt="Once upon a time", temperature=0, max_tokens=20, stream=True)
    assert "".join(ch.choices[0].text for ch in stream if ch.choices) == text


def test_stop_n_and_max_tokens(client):
    full = chat(client, CAPITAL, max_tokens=32).choices[0].message.content
    stopped = chat(client, CAPITAL, max_tokens=32, stop=["Paris"])
    assert stopped.choices[0].message.content == full[: full.index("Paris")]
    two = chat(client, CAPITAL, max_tokens=16, n=2)
    assert len(two.choices) == 2 and two.choices[0].message.content == two.choices[1].message.content == full
    short = chat(client, CAPITAL, max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3


def test_streamed_completion_logprobs_come_once_per_token(client):
    """Each token's logprobs arrive once, in order, per choice: together the streamed ones are the non-streamed."""
    kw = dict(model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=8, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    for n in (1, 2):
        tokens, logprobs = {}, {}
        for chunk in client.completions.create(**kw, n=n, stream=True):
            for choice in chunk.choices:
                if choice.logprobs is not None:
                    tokens.setdefault(choice.index, []).extend(choice.logprobs.tokens)
                    logprobs.setdefault(choice.index, []).extend(choice.logprobs.token_logprobs)
        assert sorted(tokens) == list(range(n)), tokens
        for index in range(n):
            assert tokens[index] == whole.tokens and len(whole.tokens) == 8, (tokens, whole.tokens)
            assert logprobs[index] == pytest.approx(whole.token_logprobs, abs=1e-4)


def test_chat_prompt_is_the_model_template(stack, local):
    from fastchat.conversation import Conversation, SeparatorStyle
    conv = requests.post(f"{stack['worker']}/worker_get_conv_template", json={"model": MODEL}).json()["conv"]
    tokenizer = local.get_tokenizer()
    for messages in (CAPITAL, [{"role": "system", "content": "You are terse."}, *CAPITAL,
                               {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Spain?"}]):
        c = Conversation(name=conv["name"], system_template=conv["system_template"],
                         system_message=conv["system_message"], roles=conv["roles"], messages=[],
                         offset=conv["offset"], sep_style=SeparatorStyle(conv["sep_style"]), sep=conv["sep"],
                         sep2=conv["sep2"], stop_str=conv["stop_str"], stop_token_ids=conv["stop_token_ids"])
        for m in messages:  # the steps FastChat's OpenAI server takes
            if m["role"] == "system":
                c.set_system_message(m["content"])
            else:
                c.append_message(c.roles[0 if m["role"] == "user" else 1], m["content"])
        c.append_message(c.roles[1], None)
        assert c.get_prompt() == tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_32_concurrent_streams_match_single_requests(stack):
    prompts = [[{"role": "user", "content": f"Write one sentence about the number {i}."}] for i in range(8)]
    body = lambda msgs: {"model": MODEL, "messages": msgs, "temperature": 0, "max_tokens": 24, "stream": True}  # noqa

    async def stream_one(client, msgs):
        text = ""
        async with client.stream("POST", f"{stack['api']}/chat/completions", json=body(msgs)) as resp:
            assert resp.status_code == 200
            async for line in resp.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    text += chunk["choices"][0]["delta"].get("content") or ""
        return text

    async def main():
        async with httpx.AsyncClient(timeout=300) as client:
            together = await asyncio.gather(*(stream_one(client, prompts[i % 8]) for i in range(32)))
            alone = [await stream_one(client, p) for p in prompts]
        return together, alone

    together, alone = asyncio.run(main())
    assert all(together[i] == alone[i % 8] and together[i] for i in range(32))


def test_context_overflow_then_keeps_serving(client):
    from openai import BadRequestError
    with pytest.raises(BadRequestError) as err:
        chat(client, [{"role": "user", "content": "word " * 1500}], max_tokens=8)
    assert "maximum context length is 1024 tokens" in str(err.value)
    assert chat(client, CAPITAL, max_tokens=8).choices[0].message.content


def test_bad_parameters_through_the_worker(stack):
    for params, field in ((dict(top_p=0), "top_p"), (dict(temperature=-1), "temperature"), (dict(top_k=0), "top_k"),
                          (dict(stop=["x"] * 1000), "stop"), (dict(max_new_tokens=0), "max_tokens")):
        r = requests.post(f"{stack['worker']}/worker_generate", json={"prompt": "Hi", **params}, timeout=30).json()
        assert r["error_code"] == 40302 and r["text"].startswith(field), r
    r = requests.post(f"{stack['worker']}/worker_generate",
                      json={"prompt": "Give me JSON about a cat:", "temperature": 0, "max_new_tokens": 60,
                            "echo": False,
                            "response_format": {"type": "json_schema", "json_schema": {"schema": {
                                "type": "object", "properties": {"name": {"type": "string", "maxLength": 10}},
                                "required": ["name"]}}}}, timeout=60).json()
    assert r["error_code"] == 0 and "name" in json.loads(r["text"])


def test_closing_a_stream_frees_its_blocks(stack):
    stats_url = f"{stack['worker']}/worker_get_engine_stats"
    body = {"model": MODEL, "prompt": "Here is a very long story about dragons:", "temperature": 0.8,
            "max_tokens": 600, "stream": True}
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{stack['api']}/completions", json=body) as resp:
            lines = resp.iter_lines()
            for _ in range(4):
                next(lines)
            assert requests.get(stats_url).json()["num_running"] >= 1
    stats = wait_until(lambda: (s := requests.get(stats_url).json())["num_requests"] == 0 and s, 20,
                       "the aborted request to leave the engine")
    assert stats["num_free_blocks"] == stats["num_blocks"]


@pytest.mark.parametrize("route", ["completions", "chat/completions"])
def test_a_client_gone_mid_request_ends_its_generation(stack, route):
    """Non-streamed: the API server and the worker both notice the client left and the request is aborted,
    rather than generating hundreds of tokens for nobody."""
    stats_url = f"{stack['worker']}/worker_get_engine_stats"
    body = {"model": MODEL, "temperature": 0.8, "max_tokens": 900, "ignore_eos": True,
            **({"prompt": "Here is a very long story about dragons:"} if route == "completions" else
               {"messages": [{"role": "user", "content": "Tell me a very long story about dragons."}]})}
    aborted_before = finished_count(stack, "abort")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(f"{stack['api']}/{route}", json=body, timeout=httpx.Timeout(60, read=2.5))
    stats = wait_until(lambda: (s := requests.get(stats_url).json())["num_requests"] == 0 and s, 30,
                       "the abandoned request to leave the engine")
    assert stats["num_free_blocks"] == stats["num_blocks"]
    assert finished_count(stack, "abort") == aborted_before + 1  # ended by the abort, not by its 900 tokens


def finished_count(stack, reason: str) -> float:
    """The worker's dashinfer:request_success_total for one finished_reason."""
    text = requests.get(f"{stack['worker']}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("dashinfer:request_success_total{") and f'finished_reason="{reason}"' in line)


def test_two_workers_share_traffic_and_survive_a_kill(stack, client):
    second, second_url = start_worker(stack["log_dir"], stack["controller"], "worker-b")
    stack["procs"].append(second)

    def registered():
        return requests.post(f"{stack['controller']}/list_models").json()["models"] and \
            requests.post(f"{second_url}/worker_get_status", timeout=2).ok
    wait_until(registered, 180, "worker-b", [second])
    time.sleep(3)  # a heartbeat or two, so the controller knows both
    calls = lambda url: requests.post(f"{url}/worker_get_status").json()["call_ct"]  # noqa: E731
    before = calls(stack["worker"]), calls(second_url)
    for i in range(8):
        assert chat(client, [{"role": "user", "content": f"Say {i}."}], max_tokens=4).choices[0].message.content
    after = calls(stack["worker"]), calls(second_url)
    assert after[0] > before[0] and after[1] > before[1], (before, after)

    second.stop(signal.SIGKILL)

    # FastChat's controller drops a worker only when its heartbeat expires: its sweep runs every
    # EXPIRATION seconds and removes heartbeats older than EXPIRATION, so within 2 x EXPIRATION of the
    # kill. (Polling /get_worker_address to find out would itself skew the shortest-queue dispatch.)
    time.sleep(2 * int(FAST_HEARTBEATS["FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION"]) + 3)
    for _ in range(8):
        assert chat(client, CAPITAL, max_tokens=8).choices[0].message.content


def test_response_format_and_guided_fields_reach_the_engine(client):
    from test_openai_fields import check_guided_fields
    check_guided_fields(client, MODEL)


def test_fields_the_stack_cannot_honour_answer_400(client, stack):
    from test_openai_fields import check_refused_fields, common_refusals
    check_refused_fields(client, MODEL, [*common_refusals(), (dict(logprobs=True, top_logprobs=2), "logprobs")])
    # Fields FastChat's server does not forward itself reach the worker: ignore_eos runs to max_tokens.
    r = chat(client, CAPITAL, max_tokens=10, extra_body={"ignore_eos": True, "min_tokens": 2})
    assert r.usage.completion_tokens == 10 and r.choices[0].finish_reason == "length"
    # What FastChat's clients may post to the worker that it cannot honour is refused there too.
    for extra, field in (({"images": ["data:image/png;base64,AAAA"]}, "images"),
                         ({"use_beam_search": True}, "use_beam_search"), ({"best_of": 3}, "best_of")):
        r = requests.post(f"{stack['worker']}/worker_generate", json={"prompt": "Hi", "max_new_tokens": 2, **extra},
                          timeout=30).json()
        assert r["error_code"] == 40302 and r["text"].startswith(field), r


def test_a_text_only_model_refuses_images(client):
    from openai import BadRequestError
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}
    with pytest.raises(BadRequestError) as err:
        chat(client, [{"role": "user", "content": [image, {"type": "text", "text": "What is this?"}]}], max_tokens=4)
    assert "images" in str(err.value)


def test_tool_calls_and_stream_usage(client):
    from test_openai_fields import check_include_usage, check_tool_calls
    check_tool_calls(client, MODEL)
    check_include_usage(client, MODEL)


def test_reasoning_content(client):
    from test_openai_fields import check_reasoning
    check_reasoning(client, THINKER)


def test_embeddings(client, local):
    from test_openai_fields import EMBED_TEXTS, check_embeddings
    check_embeddings(client, MODEL, local.embed(EMBED_TEXTS))


def test_metrics(client, stack):
    from test_openai_fields import check_metrics
    check_metrics(lambda: requests.get(f"{stack['worker']}/metrics", timeout=10).text, client, MODEL, MODEL)
