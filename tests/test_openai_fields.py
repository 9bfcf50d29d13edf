"""OpenAI request fields through both stacks: what is honoured reaches the engine, what cannot be
honoured answers 400 naming the field, nothing is dropped silently.

The tests here check each adapter's field policy in-process (fast). The end-to-end checks below are
run with the `openai` client against the real servers by the modules that own them
(test_fastchat_worker.py: controller + worker + our OpenAI server; test_litellm_provider.py: the
LiteLLM proxy), so no extra server stack is started for them.
"""
from __future__ import annotations

import json
import os
import re

import pytest

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
CAT = [{"role": "user", "content": "Describe a cat as JSON."}]
CAT_SCHEMA = {"type": "object",
              "properties": {"name": {"type": "string", "maxLength": 10},
                             "age": {"type": "integer", "minimum": 0, "maximum": 30}},
              "required": ["name", "age"]}
PHONE = r"[0-9]{3}-[0-9]{4}"
TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}
# A tool schema with nested objects, arrays and enums (strings bounded, so a call always closes).
WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 24}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    "days": {"type": "array", "items": {"type": "integer", "minimum": 1, "maximum": 14}, "maxItems": 3},
    "options": {"type": "object", "properties": {"hourly": {"type": "boolean"},
                                                 "fields": {"type": "array", "maxItems": 2,
                                                            "items": {"enum": ["rain", "wind", "sun"]}}},
                "required": ["hourly"]}},
    "required": ["city", "unit", "options"]}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 20}},
               "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather forecast for a city",
                                           "parameters": WEATHER_PARAMS}},
         {"type": "function", "function": {"name": "get_time", "description": "The time in a timezone",
                                           "parameters": TIME_PARAMS}}]
WEATHER_ASK = [{"role": "user", "content": "What will the weather be in Paris over the next three days?"}]


# ---- end-to-end checks, called from the server test modules -------------------------------------
def _chat(client, model, stream: bool, **kw) -> str:
    kw = {"model": model, "temperature": 0, **kw}
    if stream:
        return "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(stream=True, **kw) if c.choices)
    return client.chat.completions.create(**kw).choices[0].message.content


def _complete(client, model, stream: bool, **kw) -> str:
    kw = {"model": model, "temperature": 0, **kw}
    if stream:
        return "".join(c.choices[0].text or "" for c in client.completions.create(stream=True, **kw) if c.choices)
    return client.completions.create(**kw).choices[0].text


def check_guided_fields(client, model: str) -> None:
    """response_format (json_object, json_schema) and the guided fields, under our names and vLLM's
    (in extra_body), on chat and text completions, streamed and not."""
    import jsonschema
    for stream in (False, True):
        text = _chat(client, model, stream, messages=CAPITAL, max_tokens=32, response_format={"type": "json_object"})
        assert isinstance(json.loads(text), dict), (stream, text)
        text = _chat(client, model, stream, messages=CAT, max_tokens=40,
                     response_format={"type": "json_schema", "json_schema": {"name": "cat", "schema": CAT_SCHEMA}})
        jsonschema.validate(json.loads(text), CAT_SCHEMA)
        regex = {"guided_regex" if stream else "regex": PHONE}
        text = _chat(client, model, stream, messages=[{"role": "user", "content": "Give me a phone number."}],
                     max_tokens=12, extra_body=regex)
        assert re.fullmatch(PHONE, text), (regex, text)
        choice = {"guided_choice" if stream else "choice": ["yes", "no"]}
        text = _chat(client, model, stream, messages=[{"role": "user", "content": "Is Paris in France?"}],
                     max_tokens=4, extra_body=choice)
        assert text in ("yes", "no"), (choice, text)
        schema = {"guided_json" if stream else "json_schema": {"type": "object", "properties": {
            "ok": {"type": "boolean"}}, "required": ["ok"]}}
        text = _complete(client, model, stream, prompt="Answer in JSON:", max_tokens=12, extra_body=schema)
        assert isinstance(json.loads(text)["ok"], bool), (schema, text)
    text = _complete(client, model, True, prompt="The year was", max_tokens=6,
                     extra_body={"structured_outputs": {"regex": "[0-9]{4}"}})
    assert re.fullmatch("[0-9]{4}", text), text


def _streamed_calls(stream) -> tuple[list[dict], str | None, object]:
    """Tool-call deltas of a chat stream joined into calls (as OpenAI's clients do), the finish reason,
    and the usage chunk (None when there is none)."""
    calls, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                if delta.id:
                    calls.append({"id": delta.id, "name": delta.function.name, "arguments": ""})
                calls[delta.index]["arguments"] += delta.function.arguments or ""
    return calls, finish, usage


def check_tool_calls(client, model: str) -> None:
    """tools with tool_choice required or named: 20 calls (sampled) all validate against their schema;
    streamed deltas reassemble to the non-streamed call; finish_reason tool_calls; bad tool input 400."""
    import jsonschema
    from openai import BadRequestError
    schemas = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
    choices = ["required", {"type": "function", "function": {"name": "get_weather"}},
               {"type": "function", "function": {"name": "get_time"}}]
    from concurrent.futures import ThreadPoolExecutor

    def forced(i: int):  # sampled; `required` one call each (parallel calls below), so none runs out of tokens
        choice = choices[i % 3]
        return choice, client.chat.completions.create(
            model=model, messages=WEATHER_ASK, tools=TOOLS, tool_choice=choice, temperature=0.9, seed=i,
            max_tokens=160, parallel_tool_calls=False if choice == "required" else None)

    with ThreadPoolExecutor(10) as pool:  # concurrent: the engine batches them
        results = list(pool.map(forced, range(20)))
    for choice, r in results:
        message = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls, (choice, r)
        for call in message.tool_calls:
            assert call.type == "function" and call.id
            jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])
            if isinstance(choice, dict):
                assert call.function.name == choice["function"]["name"]
    for choice in choices[:2]:
        kw = dict(model=model, messages=WEATHER_ASK, tools=TOOLS, tool_choice=choice, temperature=0, max_tokens=160)
        whole = client.chat.completions.create(**kw).choices[0].message.tool_calls
        calls, finish, _ = _streamed_calls(client.chat.completions.create(stream=True, **kw))
        assert finish == "tool_calls"
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == \
            [(c.function.name, json.loads(c.function.arguments)) for c in whole], (choice, calls, whole)
    # auto: the model may answer in text (the embedded model does here) or call; either way it parses
    for stream in (False, True):
        kw = dict(model=model, messages=WEATHER_ASK, tools=TOOLS, temperature=0, max_tokens=24)
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kw))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            calls, finish, _ = _streamed_calls(iter(chunks))
        else:
            r = client.chat.completions.create(**kw)
            text, calls, finish = r.choices[0].message.content or "", r.choices[0].message.tool_calls or [], \
                r.choices[0].finish_reason
        assert (finish == "tool_calls") == bool(calls) and (text or calls), (stream, text, calls, finish)
    # a tool result in the conversation is rendered and answered
    call = whole[0]
    follow = [*WEATHER_ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {"name": call.function.name,
                                                         "arguments": call.function.arguments}}]},
              {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 21 degrees."}]
    r = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, temperature=0, max_tokens=8)
    assert r.choices[0].message.content or r.choices[0].message.tool_calls
    bad_schema = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "string", "pattern": "("}}}}}]
    for kw, field in ((dict(tools=bad_schema, tool_choice="required"), "tools[0].function.parameters"),
                      (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
                       "tool_choice.function.name"),
                      (dict(tools=[{"type": "function", "function": {"description": "no name"}}]),
                       "tools[0].function.name"),
                      (dict(tools=TOOLS, tool_choice="always"), "tool_choice")):
        for stream in (False, True):
            with pytest.raises(BadRequestError) as err:
                client.chat.completions.create(model=model, messages=WEATHER_ASK, max_tokens=4, stream=stream, **kw)
            assert err.value.status_code == 400 and field in str(err.value), (kw, str(err.value))


def check_include_usage(client, model: str) -> None:
    """stream_options.include_usage: a last chunk with no choices and the request's usage, equal to the
    non-streamed one; cached prompt tokens counted."""
    kw = dict(model=model, messages=CAPITAL, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kw).usage
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    # OpenAI's last chunk has no choices; LiteLLM's proxy sends one with an empty delta
    assert chunks[-1].usage is not None and not any(c.delta.content or c.delta.tool_calls
                                                    for c in chunks[-1].choices), chunks[-1]
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (whole.prompt_tokens, whole.completion_tokens, whole.total_tokens)
    assert all(c.usage is None for c in chunks[:-1])
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens >= 0


def check_reasoning(client, model: str) -> None:
    """A reasoning model (tests/helpers.THINKING_TEMPLATE: the prompt opens <think>, so a random model's
    whole output is thinking): reasoning_content apart from content, streamed and not; enable_thinking
    false through chat_template_kwargs gives an answer with no reasoning."""
    kw = dict(model=model, messages=CAPITAL, temperature=0, max_tokens=8, extra_body={"ignore_eos": True})
    message = client.chat.completions.create(**kw).choices[0].message
    reasoning = getattr(message, "reasoning_content", None)
    assert reasoning and not message.content, message
    streamed = {"reasoning_content": "", "content": ""}
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            for key in streamed:
                streamed[key] += getattr(choice.delta, key, None) or ""
    assert streamed == {"reasoning_content": reasoning, "content": ""}, streamed
    kw["extra_body"] = {"ignore_eos": True, "chat_template_kwargs": {"enable_thinking": False}}
    message = client.chat.completions.create(**kw).choices[0].message
    assert message.content and not getattr(message, "reasoning_content", None), message


EMBED_TEXTS = ["The capital of France is Paris.", "A cat sat on the mat.", "Hello"]


def check_embeddings(client, model: str, reference: list[list[float]], base64_honoured: bool = True) -> None:
    """/v1/embeddings with the openai client: one vector per input in order, equal (cosine > 0.9999) to
    `reference` (the engine's own fp32 embeddings, which tests/test_embeddings.py holds equal to HF's),
    unit length; base64 decodes to the same floats; usage counts the prompt tokens; bad input 400."""
    import base64
    import math
    import struct
    from openai import BadRequestError
    r = client.embeddings.create(model=model, input=EMBED_TEXTS, **({"encoding_format": "float"}
                                                                   if base64_honoured else {}))
    assert [d.index for d in r.data] == [0, 1, 2] and r.usage.prompt_tokens > len(EMBED_TEXTS)
    for d, want in zip(r.data, reference):
        got = d.embedding
        cosine = sum(a * b for a, b in zip(got, want)) / math.sqrt(sum(a * a for a in got) * sum(b * b for b in want))
        assert len(got) == len(want) and cosine > 0.9999, cosine
        assert abs(math.sqrt(sum(a * a for a in got)) - 1.0) < 1e-4
    if base64_honoured:  # (LiteLLM refuses encoding_format for custom providers: its config drops it)
        raw = client.embeddings.with_raw_response.create(model=model, input=EMBED_TEXTS[0], encoding_format="base64")
        packed = raw.http_response.json()["data"][0]["embedding"]
        floats = list(struct.unpack(f"<{len(r.data[0].embedding)}f", base64.b64decode(packed)))
        assert max(abs(a - b) for a, b in zip(floats, r.data[0].embedding)) < 1e-6
    for kw, field in ((dict(input=[]), "input"), (dict(input="x", dimensions=8), "dimensions")):
        with pytest.raises(BadRequestError) as err:
            client.embeddings.create(model=model, **kw)
        assert err.value.status_code == 400 and field in str(err.value), (kw, str(err.value))


def metric_samples(text: str, model_label: str) -> dict[str, float]:
    """Prometheus text -> {sample name (with labels other than model_name): value} of one model."""
    from prometheus_client.parser import text_string_to_metric_families
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("model_name", None) != model_label:
                continue
            key = sample.name + "".join(f"[{k}={v}]" for k, v in sorted(labels.items()) if k != "le")
            if "le" in labels:
                continue  # bucket rows: the _count and _sum rows say enough here
            samples[key] = value = sample.value
            assert value == value, key  # not NaN
    return samples


def check_metrics(fetch, client, model: str, model_label: str) -> None:
    """/metrics parses, names the engine's gauges, and its counters move by what one request did."""
    before = metric_samples(fetch(), model_label)
    r = client.chat.completions.create(model=model, messages=CAPITAL, temperature=0, max_tokens=6,
                                       extra_body={"ignore_eos": True})
    after = metric_samples(fetch(), model_label)
    moved = {k: after[k] - before.get(k, 0.0) for k in after}
    assert moved["dashinfer:generation_tokens_total"] == r.usage.completion_tokens == 6, moved
    assert moved["dashinfer:prompt_tokens_total"] == r.usage.prompt_tokens, moved
    assert moved["dashinfer:time_to_first_token_seconds_count"] == 1, moved
    assert moved["dashinfer:inter_token_latency_seconds_count"] == 5, moved
    assert moved["dashinfer:e2e_request_latency_seconds_count"] == 1, moved
    assert moved["dashinfer:request_success_total[finished_reason=length]"] == 1, moved
    for gauge in ("dashinfer:num_requests_running", "dashinfer:num_requests_waiting",
                  "dashinfer:kv_cache_usage_perc", "dashinfer:prefix_cache_hit_rate"):
        assert gauge in after and 0 <= after[gauge], (gauge, after)
    assert after["dashinfer:kv_cache_usage_perc"] <= 1


def check_refused_fields(client, model: str, refused: list[tuple[dict, str]]) -> None:
    """Each (request arguments, field) answers 400 naming the field, streamed or not; then the server
    still serves."""
    from openai import BadRequestError
    for kw, field in refused:
        for stream in (False, True):
            with pytest.raises(BadRequestError) as err:
                client.chat.completions.create(**{"model": model, "messages": CAPITAL, "max_tokens": 2,
                                                  "stream": stream, **kw})
            assert err.value.status_code == 400 and field in str(err.value), (kw, field, str(err.value))
    # Honoured or harmless: accepted.
    r = client.chat.completions.create(model=model, messages=CAPITAL, max_tokens=2, temperature=0, user="someone",
                                       tool_choice="none", seed=7, extra_body={"min_p": 0.05})
    assert r.choices[0].message.content


def common_refusals() -> list[tuple[dict, str]]:
    return [(dict(functions=[{"name": "f"}]), "functions"),
            (dict(tool_choice="required"), "tool_choice"),
            (dict(logit_bias={"42": 5}), "logit_bias"),
            (dict(extra_body={"no_such_field": 1}), "no_such_field"),
            (dict(extra_body={"guided_grammar": "root ::= \"a\""}), "guided_grammar"),
            (dict(extra_body={"regex": "a+", "guided_choice": ["a"]}), "guided_choice"),
            (dict(messages=[{"role": "user", "content": [{"type": "input_audio",
                                                          "input_audio": {"data": "AAAA", "format": "wav"}}]}]),
             "messages[0].content[0]")]


# ---- the policies, in-process -------------------------------------------------------------------
def test_fastchat_field_policy():
    from dashinfer_fastchat.openai_fields import FieldError, check_request
    body = {"model": "m", "messages": CAPITAL}

    def ok(chat=True, **kw):
        extras, changes = check_request({**body, **kw} if chat else {"model": "m", "prompt": "Hi", **kw}, chat)
        if chat:  # a chat's messages always go to the worker, which renders them with the model's template
            assert extras.pop("chat_messages") == [{**m, "role": "system" if m["role"] == "developer" else m["role"]}
                                                   for m in kw.get("messages", CAPITAL)]
            assert changes.pop("messages")
        return extras, changes

    assert ok() == ({}, {})
    assert ok(user="u", stream=True, stream_options={"include_usage": False}, tool_choice="none", tools=[],
              parallel_tool_calls=False, logprobs=False, store=False, metadata={"a": "b"}, service_tier="auto",
              modalities=["text"], tools_unused=None) == ({"tool_choice": "none", "tools": [],
                                                           "parallel_tool_calls": False}, {})
    # tools, tool_choice, include_usage and chat_template_kwargs are this stack's own (chat route, worker)
    assert ok(tools=[TOOL], tool_choice="required", stream=True, stream_options={"include_usage": True},
              chat_template_kwargs={"enable_thinking": False})[0] == \
        {"tools": [TOOL], "tool_choice": "required", "chat_template_kwargs": {"enable_thinking": False}}
    tool_turns = [*CAPITAL, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}]},
                  {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    extras, changes = check_request({**body, "messages": tool_turns}, True)
    assert extras["chat_messages"][1]["content"] == "" and extras["chat_messages"][2]["role"] == "tool"
    assert [m["role"] for m in changes["messages"]] == ["user", "assistant", "user"]
    assert ok(response_format={"type": "json_object"}, seed=1, min_p=0.1, repetition_penalty=1.1, min_tokens=1,
              ignore_eos=False)[0] == {"response_format": {"type": "json_object"}, "seed": 1, "min_p": 0.1,
                                      "repetition_penalty": 1.1, "min_tokens": 1, "ignore_eos": False}
    assert ok(response_format={"type": "text"}) == ({}, {})
    for name, canonical in (("json_schema", "json_schema"), ("guided_json", "json_schema"), ("regex", "regex"),
                            ("guided_regex", "regex"), ("choice", "choice"), ("guided_choice", "choice")):
        assert ok(**{name: "x"})[0] == {canonical: "x"}
    assert ok(structured_outputs={"json": {"type": "object"}})[0] == {"json_schema": {"type": "object"}}
    assert ok(structured_outputs={"json_object": True})[0] == {"json_object": True}
    assert ok(max_completion_tokens=5)[1] == {"max_tokens": 5}
    developer = [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert check_request({**body, "messages": developer}, True)[1] == {"messages": [{"role": "system",
                                                                                     "content": "a\nb"}]}
    assert ok(chat=False, logprobs=2, echo=True, guided_regex="a")[0] == {"regex": "a"}
    for kw, field in ((dict(functions=[{"name": "f"}]), "functions"), (dict(function_call="auto"), "function_call"),
                      (dict(stream_options={"include_obfuscation": True}), "stream_options"),
                      (dict(logprobs=True), "logprobs"), (dict(top_logprobs=2), "top_logprobs"),
                      (dict(logit_bias={"1": 2}), "logit_bias"), (dict(echo=True), "echo"), (dict(store=True), "store"),
                      (dict(service_tier="flex"), "service_tier"), (dict(modalities=["audio"]), "modalities"),
                      (dict(foo=1), "foo"), (dict(guided_grammar="x"), "guided_grammar"),
                      (dict(guided_decoding_backend="xgrammar"), "guided_decoding_backend"),
                      (dict(structured_outputs={"grammar": "x"}), "structured_outputs.grammar"),
                      (dict(regex="a", choice=["a"]), "choice"),
                      (dict(response_format={"type": "json_object"}, guided_json={}), "guided_json"),
                      (dict(response_format="json"), "response_format"),
                      (dict(seed=1, n=2), "seed"),
                      (dict(max_tokens=4, max_completion_tokens=5), "max_completion_tokens"),
                      (dict(messages=[{"role": "function", "content": "x", "name": "f"}]), "messages[0].role"),
                      (dict(messages=[{"role": "user", "content": "x", "name": "bob"}]), "messages[0].name"),
                      (dict(messages=[{"role": "user", "content": "x", "tool_calls": []}]), "messages[0].tool_calls"),
                      (dict(messages=[{"role": "assistant", "content": None}]), "messages[0].content"),
                      (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
                       "messages[0].content[0]"),
                      (dict(messages=[]), "messages"), (dict(messages="Hi"), "messages"),
                      (dict(stream_options={"include_usage": True}), "stream_options"),
                      (dict(stop=""), "stop"), (dict(stop=["a", ""]), "stop")):
        with pytest.raises(FieldError) as err:
            ok(**kw)
        assert err.value.param == field and str(err.value).startswith(field), (kw, str(err.value))
    for kw, field in ((dict(suffix="x"), "suffix"), (dict(best_of=2), "best_of"), (dict(use_beam_search=True),
                                                                                   "use_beam_search"),
                      (dict(prompt=[1, 2, 3]), "prompt"), (dict(tools=[TOOL]), "tools"),
                      (dict(stream=True, stream_options={"include_usage": True}), "stream_options")):
        with pytest.raises(FieldError) as err:
            ok(chat=False, **kw)
        assert err.value.param == field, (kw, str(err.value))


def test_fastchat_streams_wait_for_a_queued_worker(monkeypatch):
    """FastChat's server would drop a stream after 100 s without a byte from the worker (a plain-text 500)."""
    import types

    from dashinfer_fastchat.openai_api_server import WORKER_WAIT_SECONDS, patch_worker_timeout
    server = types.SimpleNamespace(WORKER_API_TIMEOUT=100)
    monkeypatch.delenv("FASTCHAT_WORKER_API_TIMEOUT", raising=False)
    patch_worker_timeout(server)
    assert server.WORKER_API_TIMEOUT == WORKER_WAIT_SECONDS >= 3600
    server.WORKER_API_TIMEOUT = 30
    monkeypatch.setenv("FASTCHAT_WORKER_API_TIMEOUT", "30")  # the user's own choice stands
    patch_worker_timeout(server)
    assert server.WORKER_API_TIMEOUT == 30


def test_litellm_field_policy():
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    import litellm

    from dashinfer_litellm.provider import conversation, sampling_params, split_params

    def params(**optional):
        return sampling_params(split_params(optional, "m")[1], "m")

    p = params(max_tokens=3, stream=True, stream_options={"include_usage": True}, user="u", logit_bias={},
               store=False, service_tier="default", timeout=5)
    assert p.max_tokens == 3 and p.guided_spec is None
    for optional, kind in ((dict(response_format={"type": "json_object"}), "json_object"),
                           (dict(json_schema={"type": "object"}), "json_schema"),
                           (dict(extra_body={"guided_json": {"type": "object"}}), "json_schema"),
                           (dict(guided_regex="a+"), "regex"), (dict(extra_body={"regex": "a+"}), "regex"),
                           (dict(guided_choice=["a", "b"]), "choice"),
                           (dict(structured_outputs={"choice": ["a"]}), "choice"),
                           (dict(structured_outputs={"json_object": True}), "json_object")):
        assert params(**optional).guided_spec.kind == kind, optional
    for optional, field in ((dict(functions=[{"name": "f"}]), "functions"), (dict(logit_bias={"1": 2}), "logit_bias"),
                            (dict(stream_options={"include_obfuscation": True}), "stream_options"),
                            (dict(store=True), "store"), (dict(foo=1), "foo"),
                            (dict(extra_body={"foo": 1}), "foo"), (dict(guided_grammar="x"), "guided_grammar"),
                            (dict(regex="a", guided_regex="b"), "guided_regex"),
                            (dict(response_format={"type": "json_object"}, choice=["a"]), "choice"),
                            (dict(structured_outputs={"grammar": "x"}), "structured_outputs.grammar"),
                            (dict(seed=1, extra_body={"seed": 2}), "seed")):
        with pytest.raises(litellm.BadRequestError) as err:
            params(**optional)
        assert f"{field}:" in str(err.value), (optional, str(err.value))
    assert conversation([{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                         "text": "b"}]}], "m") == \
        [{"role": "system", "content": "a\nb"}]
    assert conversation([{"role": "tool", "tool_call_id": "c1", "content": "x"}], "m") == \
        [{"role": "tool", "tool_call_id": "c1", "content": "x"}]
    for messages, field in (([], "messages"), ([{"role": "function", "content": "x"}], "messages[0].role"),
                            ([{"role": "user", "content": "x", "name": "bob"}], "messages[0].name"),
                            ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}],
                             "messages[0].content[0]")):
        with pytest.raises(litellm.BadRequestError) as err:
            conversation(messages, "m")
        assert f"{field}:" in str(err.value), str(err.value)


def test_fastchat_worker_keeps_an_explicit_conv_template():
    """With --conv-template, chats go through FastChat's prompt unless they carry what it cannot hold."""
    from dashinfer_fastchat.worker import model_template_renders
    plain = {"chat_messages": CAPITAL}
    assert model_template_renders(plain, conv_template_given=False)
    assert not model_template_renders(plain, conv_template_given=True)
    assert not model_template_renders({**plain, "tools": [TOOL], "tool_choice": "none"}, True)
    for extra in ({"tools": [TOOL]}, {"tool_choice": "required"}, {"chat_template_kwargs": {"enable_thinking": 0}},
                  {"chat_messages": [{"role": "tool", "content": "x"}]},
                  {"chat_messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]}):
        assert model_template_renders({**plain, **extra}, True), extra
