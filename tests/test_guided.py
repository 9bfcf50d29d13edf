"""Guided decoding: outputs match their spec at temperature 0 and 1, free requests in the same batch
are untouched, bad specs fail clearly, slow compiles time out alone, jump-forward works."""
from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from dashinfer_core import LLM, AsyncEngine, InvalidParameterError, SamplingParams
from dashinfer_core.llm import apply_chat_template

NAME = {"type": "string", "minLength": 1, "maxLength": 24}
SCHEMAS = [
    {"type": "object", "properties": {"name": NAME, "age": {"type": "integer"}}, "required": ["name", "age"]},
    {"type": "object", "properties": {"city": NAME, "country": NAME}, "required": ["city", "country"]},
    {"type": "object", "properties": {"person": {"type": "object", "properties": {
        "first": NAME, "last": NAME}, "required": ["first", "last"]}}, "required": ["person"]},
    {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string", "maxLength": 12},
                                               "minItems": 1, "maxItems": 3}}, "required": ["tags"]},
    {"type": "object", "properties": {"scores": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                                             "maximum": 100},
                                                 "minItems": 2, "maxItems": 4}}, "required": ["scores"]},
    {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}}, "required": ["colour"]},
    {"type": "object", "properties": {"mood": {"type": "string", "enum": ["happy", "sad", "calm"]},
                                      "level": {"type": "integer", "minimum": 1, "maximum": 5}},
     "required": ["mood", "level"]},
    {"type": "object", "properties": {"price": {"type": "number", "minimum": 0, "maximum": 1000}},
     "required": ["price"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}, "note": NAME}, "required": ["ok"]},
    {"type": "object", "properties": {"title": NAME, "subtitle": NAME, "pages": {"type": "integer"}},
     "required": ["title"]},
    {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{3}$"}},
     "required": ["code"]},
    {"type": "object", "properties": {"word": {"type": "string", "minLength": 3, "maxLength": 8}},
     "required": ["word"]},
    {"type": "object", "properties": {"value": {"anyOf": [{"type": "integer"}, {"type": "string", "maxLength": 10}]}},
     "required": ["value"]},
    {"type": "object", "properties": {"point": {"type": "object", "properties": {
        "x": {"type": "integer"}, "y": {"type": "integer"}}, "required": ["x", "y"]},
        "label": NAME}, "required": ["point", "label"]},
    {"type": "object", "properties": {"items": {"type": "array", "maxItems": 2, "items": {
        "type": "object", "properties": {"id": {"type": "integer"}, "name": NAME}, "required": ["id", "name"]}}},
     "required": ["items"]},
    {"type": "array", "items": {"type": "integer", "minimum": -5, "maximum": 5}, "minItems": 1, "maxItems": 5},
]
ASK = "Reply with JSON only. Describe something from everyday life."


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", max_num_seqs=64, block_size=16)


def chat_ids(llm, text):
    return apply_chat_template(llm.get_tokenizer(), [{"role": "user", "content": text}])


def test_json_schemas_validate_greedy_and_sampled(llm):
    prompt = chat_ids(llm, ASK)
    params = []
    for schema in SCHEMAS:
        params.append(SamplingParams(max_tokens=160, temperature=0.0, json_schema=schema))
        for seed in (1, 2):
            params.append(SamplingParams(max_tokens=160, temperature=1.0, seed=seed, json_schema=json.dumps(schema)))
    outs = llm.generate([prompt] * len(params), params)
    for i, out in enumerate(outs):
        schema = SCHEMAS[i // 3]
        assert out.finish_reason == "stop", (schema, out.text)
        jsonschema.validate(json.loads(out.text), schema)
    assert llm.engine.guided.num_forced_tokens > 0  # jump-forward filled in keys and punctuation
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_json_object_output_and_precompile(llm):
    """json_object output is a JSON object; the engine compiled its pattern when it started, so every
    json_object request (the first included) is a cache hit and nothing is compiled for it."""
    compiler = llm.engine.guided.compiler
    hits, compiles = compiler.num_cache_hits, compiler.num_built + compiler.num_disk_hits
    prompts = [chat_ids(llm, ASK), chat_ids(llm, "Give me a JSON object describing a cat.")]
    params = [SamplingParams(max_tokens=120, temperature=t, seed=s, json_object=True)
              for t, s in ((0.0, None), (1.0, 1), (1.0, 2))]
    outs = llm.generate([p for p in prompts for _ in params], params * len(prompts))
    assert compiler.num_cache_hits - hits == len(outs)
    assert compiler.num_built + compiler.num_disk_hits == compiles
    finished = [o for o in outs if o.finish_reason == "stop"]
    assert len(finished) >= 2, [o.text for o in outs]
    for out in outs:
        assert out.text.startswith("{"), out.text
    for out in finished:
        assert isinstance(json.loads(out.text), dict), out.text


def test_regex_and_choice_fullmatch(llm):
    prompt = chat_ids(llm, "Give me a date and a phone number.")
    specs = [dict(regex=r"\d{4}-\d{2}-\d{2}"), dict(regex=r"\(\d{3}\) \d{3}-\d{4}"),
             dict(regex=r"(cat|dog)s? (run|sleep)"), dict(choice=["yes", "no", "maybe not"]),
             dict(choice=["Paris", "London", "Berlin (DE)"])]
    params = [SamplingParams(max_tokens=30, temperature=t, seed=s, **spec)
              for spec in specs for t, s in ((0.0, None), (1.0, 3), (1.0, 4))]
    outs = llm.generate([prompt] * len(params), params)
    for p, out in zip(params, outs):
        pattern = p.regex if p.regex else "|".join(re.escape(c) for c in p.choice)
        assert re.fullmatch(pattern, out.text), (pattern, out.text)
        assert out.finish_reason == "stop"


def test_guided_requests_leave_free_ones_untouched(llm):
    free_prompts = [chat_ids(llm, f"Tell me something about the number {i}.") for i in range(6)]
    free = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    alone = [o.token_ids for o in llm.generate(free_prompts, free)]
    guided = SamplingParams(max_tokens=60, temperature=0.0, json_schema=SCHEMAS[0])
    mixed = llm.generate([p for fp in free_prompts for p in (fp, chat_ids(llm, ASK))],
                         [q for _ in free_prompts for q in (free, guided)])
    assert [o.token_ids for o in mixed[::2]] == alone
    for out in mixed[1::2]:
        jsonschema.validate(json.loads(out.text), SCHEMAS[0])


def test_bad_specs_fail_clearly():
    with pytest.raises(InvalidParameterError, match="json_schema: cannot be compiled"):
        SamplingParams(json_schema={"type": "object", "properties": {"a": {"type": "no-such-type"}}})
    with pytest.raises(InvalidParameterError, match="json_schema: is not valid JSON"):
        SamplingParams(json_schema="{not json")
    with pytest.raises(InvalidParameterError, match="regex: is not a valid regular expression"):
        SamplingParams(regex="(unclosed")
    with pytest.raises(InvalidParameterError, match="at most one guided-decoding field"):
        SamplingParams(regex="a+", choice=["a"])
    with pytest.raises(InvalidParameterError, match="choice"):
        SamplingParams(choice=["ok", ""])
    with pytest.raises(InvalidParameterError, match="limit is"):
        SamplingParams(regex="a" * 70_000)
    with pytest.raises(InvalidParameterError, match="response_format"):
        SamplingParams.from_response_format({"type": "xml"})
    assert SamplingParams.from_response_format({"type": "json_object"}).json_object
    schema = SCHEMAS[0]
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    assert SamplingParams.from_response_format(rf, max_tokens=5).json_schema == schema


def test_slow_compile_times_out_alone(default_model_dir):
    llm = LLM(dtype="float32", device="cpu", guided_compile_timeout=0.3)
    # Many bounded-length string fields: tens of thousands of FSM states, seconds to compile.
    slow = {"type": "object", "properties": {f"field_{i}": {"type": "string", "maxLength": 40} for i in range(16)},
            "required": [f"field_{i}" for i in range(16)]}
    prompts = ["Hello", "Write JSON", "Count to three"]
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True),
              SamplingParams(max_tokens=50, json_schema=slow),
              SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)]
    outs = llm.generate(prompts, params)
    assert outs[1].finish_reason == "error" and "guided_compile_timeout" in outs[1].error
    assert [len(o.token_ids) for o in (outs[0], outs[2])] == [8, 8] and outs[0].error is None
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_requests == 0


def test_guided_with_streaming_n_and_preemption(tiny_models, default_model_dir):
    engine = AsyncEngine(dtype="float32", device="cpu", block_size=16, kv_cache_memory=40 * 30 * 2 * 3 * 16 * 64 * 4)
    schema = SCHEMAS[3]
    prompt = apply_chat_template(engine.tokenizer, [{"role": "user", "content": ASK}])

    async def one(seed):
        text, last = "", None
        async for out in engine.generate(prompt, SamplingParams(n=2, max_tokens=80, temperature=1.0, seed=seed,
                                                                json_schema=schema)):
            text += out.outputs[0].delta_text
            last = out
        return text, last

    async def main():
        return await asyncio.gather(*(one(s) for s in range(8)))

    try:
        results = asyncio.run(main())
        for text, last in results:
            assert text == last.outputs[0].text
            for completion in last.outputs:
                jsonschema.validate(json.loads(completion.text), schema)
        assert engine.get_stats().num_preemptions > 0
    finally:
        engine.shutdown()
