"""Bad input, load and faults through the servers (FastChat stack and LiteLLM proxy), as real processes
on 127.0.0.1 with bounded request counts. Prints the bad-input answers (the README table comes from it)."""
from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time

import httpx
import pytest
import requests

from servers import Process, free_port, python_module, start_litellm_proxy, wait_until

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
HI = [{"role": "user", "content": "Hi"}]
SLOW_SCHEMA = {"type": "object", "properties": {f"f{i}": {"type": "string", "maxLength": 40} for i in range(16)},
               "required": [f"f{i}" for i in range(16)]}


def rss_mb(pid: int) -> float:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@pytest.fixture(scope="module")
def fastchat(tmp_path_factory, default_model_dir):
    log_dir = tmp_path_factory.mktemp("fastchat-reliability")
    env = {"LOGDIR": str(log_dir), "DASHINFER_MAX_BODY_BYTES": str(2 << 20)}
    c_port, w_port, a_port = free_port(), free_port(), free_port()
    controller = f"http://127.0.0.1:{c_port}"
    procs = [Process(python_module("fastchat.serve.controller", "--host", "127.0.0.1", "--port", str(c_port)),
                     log_dir, "controller", env)]
    wait_until(lambda: requests.get(f"{controller}/test_connection", timeout=2).ok, 60, "controller", procs)
    procs.append(Process(python_module("dashinfer_fastchat.worker", "--port", str(w_port), "--worker-address",
                                       f"http://127.0.0.1:{w_port}", "--controller-address", controller,
                                       "--max-model-len", "1024", "--limit-worker-concurrency", "16",
                                       "--guided-compile-timeout", "1.0"),
                         log_dir, "worker", env))
    procs.append(Process(python_module("dashinfer_fastchat.openai_api_server", "--host", "127.0.0.1", "--port",
                                       str(a_port), "--controller-address", controller), log_dir, "api", env))
    api = f"http://127.0.0.1:{a_port}/v1"
    wait_until(lambda: MODEL in [m["id"] for m in requests.get(f"{api}/models", timeout=2).json()["data"]],
               180, "the model", procs)
    yield {"api": api, "worker": f"http://127.0.0.1:{w_port}", "worker_proc": procs[1], "log_dir": log_dir}
    for p in reversed(procs):
        p.stop()


@pytest.fixture(scope="module")
def litellm_proxy(tmp_path_factory, default_model_dir):
    proxy = start_litellm_proxy(tmp_path_factory.mktemp("litellm-reliability"),
        "model_list:\n  - model_name: smollm2\n    litellm_params: {model: dashinfer/default, max_model_len: 1024, "
        "guided_compile_timeout: 1.0}\nlitellm_settings:\n  disable_stop_sequence_limit: true\n"
        "  custom_provider_map:\n"
        "    - {provider: dashinfer, custom_handler: dashinfer_litellm.handler}\n")
    yield {**proxy, "api": f"{proxy['base']}/v1"}
    proxy["proc"].stop()


def post(url, body=None, raw=None, headers=None, timeout=120):
    headers = dict(headers or {})
    if raw is not None:
        headers.setdefault("Content-Type", "application/json")
        return requests.post(url, data=raw, headers=headers, timeout=timeout)
    return requests.post(url, json=body, headers=headers, timeout=timeout)


def chat_body(model, **kw):
    return {"model": model, "messages": kw.pop("messages", HI), "max_tokens": kw.pop("max_tokens", 4), **kw}


def cases(model):
    """(name, path, json body or raw bytes, field or text the answer must name)."""
    long_messages = [{"role": "user", "content": "word " * 3000}]
    return [
        ("empty prompt", "/completions", {"model": model, "prompt": "", "max_tokens": 4}, "prompt"),
        ("prompt over the context limit", "/chat/completions", chat_body(model, messages=long_messages),
         "context length"),
        ("max_tokens 0", "/chat/completions", chat_body(model, max_tokens=0), "max_tokens"),
        ("max_tokens negative", "/chat/completions", chat_body(model, max_tokens=-5), "max_tokens"),
        ("temperature < 0", "/chat/completions", chat_body(model, temperature=-0.5), "temperature"),
        ("top_p 0", "/chat/completions", chat_body(model, top_p=0), "top_p"),
        ("top_p > 1", "/chat/completions", chat_body(model, top_p=1.5), "top_p"),
        ("top_k 0", "/chat/completions", chat_body(model, top_k=0), "top_k"),
        ("n 0", "/chat/completions", chat_body(model, n=0), "n"),
        ("n huge", "/chat/completions", chat_body(model, n=100000), "n"),
        ("1,000 stop strings", "/chat/completions", chat_body(model, stop=[f"s{i}" for i in range(1000)]), "stop"),
        ("stream with a bad parameter", "/chat/completions", chat_body(model, top_p=0, stream=True), "top_p"),
        ("logprobs out of range", "/completions", {"model": model, "prompt": "Hi", "max_tokens": 2, "logprobs": 50},
         "logprobs"),
        ("non-UTF-8 body", "/chat/completions", b'\xff\xfe{"model": "x"}', ""),
        ("malformed JSON", "/chat/completions", b'{"model": "x", "messages": [', ""),
        ("unknown model", "/chat/completions", chat_body("no-such-model"), "no-such-model"),
        ("tool schema that is not a JSON schema", "/chat/completions",
         chat_body(model, tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
                   tool_choice="required"), "tools[0].function.parameters"),
        ("functions (deprecated)", "/chat/completions", chat_body(model, functions=[{"name": "f"}]), "functions"),
        ("logit_bias (not supported yet)", "/chat/completions", chat_body(model, logit_bias={"42": 5}), "logit_bias"),
        ("unknown field", "/chat/completions", chat_body(model, no_such_field=1), "no_such_field"),
        ("invalid JSON schema", "/chat/completions",
         chat_body(model, response_format={"type": "json_schema", "json_schema": {"schema": {"type": "no-such-type"}}}),
         "json_schema"),
        ("malformed regex", "/chat/completions", chat_body(model, regex="(a+)+(b|c"), "regex"),
    ]


def check_cases(api, model, headers=None, extra=()):
    rows = []
    for name, path, body, needle in [*cases(model), *extra]:
        r = post(api + path, raw=body if isinstance(body, bytes) else None,
                 body=None if isinstance(body, bytes) else body, headers=headers)
        text = r.text
        rows.append((name, r.status_code, text[:160].replace("\n", " ")))
        assert 400 <= r.status_code < 500, (name, r.status_code, text[:500])
        assert needle.lower() in text.lower(), (name, text[:500])
    return rows


def test_bad_inputs_through_fastchat(fastchat):
    extra = [("megabyte-sized body", "/chat/completions",
              json.dumps(chat_body(MODEL, messages=[{"role": "user", "content": "x" * (3 << 20)}])).encode(),
              "limit")]
    extra.append(("stream_options with an unknown option", "/chat/completions",
                  chat_body(MODEL, stream=True, stream_options={"include_obfuscation": True}), "stream_options"))
    # The schema's compile runs past --guided-compile-timeout in the worker: that request fails alone.
    extra.append(("schema that compiles too long", "/chat/completions",
                  chat_body(MODEL, response_format={"type": "json_schema", "json_schema": {"schema": SLOW_SCHEMA}}),
                  "guided_compile_timeout"))
    rows = check_cases(fastchat["api"], MODEL, extra=extra)
    # A regex that backtracking engines take exponential time on is an ordinary automaton here.
    r = post(fastchat["api"] + "/chat/completions", chat_body(MODEL, max_tokens=12, temperature=0,
                                                             regex="(x+x+)+y"), timeout=60)
    rows.append(("catastrophic-backtracking regex (x+x+)+y", r.status_code, r.text[:160]))
    assert r.status_code == 200 and re.fullmatch("x*y?", r.json()["choices"][0]["message"]["content"]), r.text
    worker = fastchat["worker"]
    r = post(f"{worker}/worker_generate", raw=b"{not json")
    assert r.status_code == 400 and "malformed JSON" in r.text
    print("\nFastChat bad-input answers:")
    for row in rows:
        print(" | ".join(map(str, row)))
    assert post(fastchat["api"] + "/chat/completions", chat_body(MODEL)).status_code == 200  # still serving


def test_256_streams_through_fastchat_wait_rather_than_fail(fastchat):
    pid = fastchat["worker_proc"].proc.pid
    before = rss_mb(pid)
    samples = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            status = requests.post(f"{fastchat['worker']}/worker_get_status").json()
            samples.append((status["queue_length"], status["engine"]["num_requests"]))
            time.sleep(0.2)

    async def one(client, i):
        text = ""
        body = chat_body(MODEL, messages=[{"role": "user", "content": f"Count to {i % 7 + 2}."}], max_tokens=6,
                         temperature=0, stream=True)
        async with client.stream("POST", f"{fastchat['api']}/chat/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        return text

    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(256)))

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.monotonic()
    try:
        texts = asyncio.run(main())
    finally:
        stop.set()
        watcher.join()
    elapsed = time.monotonic() - start
    after = rss_mb(pid)
    print(f"\n256 streams through FastChat in {elapsed:.1f} s; worker RSS {before:.0f} -> {after:.0f} MB; "
          f"peak queue {max(q for q, _ in samples)}")
    assert len(texts) == 256 and all(texts)
    assert max(q for q, _ in samples) > 16  # requests beyond the limit were queued, not refused
    assert all(n <= 16 for _, n in samples)  # never more than --limit-worker-concurrency in the engine
    final = requests.post(f"{fastchat['worker']}/worker_get_status").json()
    assert final["queue_length"] == 0 and final["engine"]["num_free_blocks"] == final["engine"]["num_blocks"]
    assert after - before < 1024


def test_sigterm_drains_in_flight_requests(tmp_path, default_model_dir):
    port = free_port()
    worker = Process(python_module("dashinfer_fastchat.worker", "--port", str(port), "--no-register",
                                   "--max-model-len", "1024"), tmp_path, "drain-worker", {"LOGDIR": str(tmp_path)})
    url = f"http://127.0.0.1:{port}"
    wait_until(lambda: requests.post(f"{url}/worker_get_status", timeout=2).ok, 120, "worker", [worker])
    results, started, late_chunks = {}, [threading.Event() for _ in range(4)], []
    sigterm_sent = threading.Event()

    def stream(i):
        chunks = []
        with requests.post(f"{url}/worker_generate_stream", json={"prompt": f"Story {i}:", "max_new_tokens": 64,
                                                                  "temperature": 0, "echo": False},
                           stream=True, timeout=120) as r:
            for chunk in r.iter_lines(delimiter=b"\0"):
                if chunk:
                    chunks.append(json.loads(chunk))
                    started[i].set()
                    if sigterm_sent.is_set():
                        late_chunks.append(i)
        results[i] = chunks[-1]

    threads = [threading.Thread(target=stream, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    # Signal only once every request is streaming: one still connecting when the server stops listening is
    # refused (connection reset), which is not what this test is about.
    for event in started:
        assert event.wait(60), "a stream never started"
    sigterm_sent.set()
    worker.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(60)
    worker.proc.wait(60)  # raises if the worker did not exit once drained
    assert not any(t.is_alive() for t in threads)
    assert late_chunks, "every stream had finished before SIGTERM: nothing was drained"
    assert len(results) == 4 and all(r["finish_reason"] == "length" and r["error_code"] == 0 for r in results.values())
    worker.stop()


def test_bad_inputs_through_litellm(litellm_proxy):
    headers = {"Authorization": f"Bearer {litellm_proxy['key']}"}
    rows = check_cases(litellm_proxy["api"], "smollm2", headers=headers)
    # The slow schema is accepted, then its compile times out: the request fails alone with a 5xx.
    r = post(litellm_proxy["api"] + "/chat/completions",
             chat_body("smollm2", response_format={"type": "json_schema", "json_schema": {"schema": SLOW_SCHEMA}}),
             headers=headers)
    rows.append(("schema that compiles too long", r.status_code, r.text[:160]))
    assert r.status_code >= 400 and "guided_compile_timeout" in r.text
    print("\nLiteLLM bad-input answers:")
    for row in rows:
        print(" | ".join(map(str, row)))
    assert post(litellm_proxy["api"] + "/chat/completions", chat_body("smollm2"), headers=headers).status_code == 200
    stats = next(iter(requests.get(litellm_proxy["stats"]).json().values()))
    assert stats["num_requests"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]


def test_256_streams_through_litellm(litellm_proxy):
    headers = {"Authorization": f"Bearer {litellm_proxy['key']}"}

    async def one(client, i):
        text = ""
        body = chat_body("smollm2", messages=[{"role": "user", "content": f"Count to {i % 7 + 2}."}], max_tokens=6,
                         temperature=0, stream=True)
        async with client.stream("POST", f"{litellm_proxy['api']}/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices:
                        text += choices[0]["delta"].get("content") or ""
        return text

    async def main():
        limits = httpx.Limits(max_connections=300, max_keepalive_connections=300)
        async with httpx.AsyncClient(timeout=600, limits=limits) as client:
            return await asyncio.gather(*(one(client, i) for i in range(256)))

    pid = litellm_proxy["proc"].proc.pid
    before = rss_mb(pid)
    start = time.monotonic()
    texts = asyncio.run(main())
    after = rss_mb(pid)
    print(f"\n256 streams through LiteLLM in {time.monotonic() - start:.1f} s; proxy RSS {before:.0f} -> {after:.0f} MB")
    assert len(texts) == 256 and all(texts)
    stats = next(iter(requests.get(litellm_proxy["stats"]).json().values()))
    assert stats["num_requests"] == 0 and stats["num_free_blocks"] == stats["num_blocks"]
    assert after - before < 1024
