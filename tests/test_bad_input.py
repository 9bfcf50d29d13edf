"""Bad input: a clear error naming the field and the limit, raised before anything is queued, and the
engine keeps serving everyone else."""
from __future__ import annotations

import json

import pytest

from dashinfer_core import (LLM, EngineConfig, InvalidParameterError, PromptTooLongError, SamplingParams,
                            UnsupportedModelError)


@pytest.fixture(scope="module")
def llm(tiny_models):
    return LLM(str(tiny_models["qwen2"]), dtype="float32", device="cpu", block_size=16, max_model_len=256)


@pytest.mark.parametrize("kwargs, field, limit", [
    (dict(max_tokens=0), "max_tokens", ">= 1"),
    (dict(max_tokens=-5), "max_tokens", ">= 1"),
    (dict(temperature=-0.1), "temperature", ">= 0"),
    (dict(temperature=float("nan")), "temperature", "finite"),
    (dict(top_p=0.0), "top_p", "(0, 1]"),
    (dict(top_p=1.5), "top_p", "(0, 1]"),
    (dict(top_k=0), "top_k", "-1 (off) or >= 1"),
    (dict(top_k=-2), "top_k", "-1 (off) or >= 1"),
    (dict(min_p=1.5), "min_p", "[0, 1]"),
    (dict(n=0), "n", ">= 1"),
    (dict(n=10_000), "n", "<= 128"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "> 0"),
    (dict(presence_penalty=3.0), "presence_penalty", "[-2, 2]"),
    (dict(stop=["x"] * 1000), "stop", "at most 64"),
    (dict(stop=[""]), "stop", "non-empty"),
    (dict(logprobs=-1), "logprobs", ">= 0"),
    (dict(min_tokens=5, max_tokens=2), "min_tokens", "<= max_tokens"),
])
def test_sampling_params_reject_out_of_range(kwargs, field, limit):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(field) and limit in str(err.value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(block_size=24), "block_size"),
    (dict(dtype="int3"), "dtype"),
    (dict(max_num_seqs=0), "max_num_seqs"),
    (dict(kv_cache_memory=0), "kv_cache_memory"),
    (dict(attention_backend="cudnn"), "attention_backend"),
    (dict(no_such_option=1), "no_such_option"),
])
def test_engine_config_rejects_bad_options(kwargs, field):
    with pytest.raises(InvalidParameterError, match=field):
        EngineConfig.from_kwargs(**kwargs)


def test_engine_level_limits(llm):
    with pytest.raises(InvalidParameterError, match="prompt: must not be empty"):
        llm.generate("", SamplingParams())
    with pytest.raises(InvalidParameterError, match="prompt"):
        llm.generate([[]], SamplingParams())
    with pytest.raises(PromptTooLongError, match="maximum context length is 256 tokens") as err:
        llm.generate([list(range(100, 400))], SamplingParams())
    assert err.value.field == "prompt" and err.value.num_prompt_tokens == 300
    with pytest.raises(InvalidParameterError, match="max_tokens: must be <= the context length 256"):
        llm.generate("hi", SamplingParams(max_tokens=1000))
    with pytest.raises(InvalidParameterError, match="logprobs: must be <= 20"):
        llm.generate("hi", SamplingParams(logprobs=21))
    with pytest.raises(InvalidParameterError, match="stop_token_ids"):
        llm.generate("hi", SamplingParams(stop_token_ids=[10**9]))
    with pytest.raises(InvalidParameterError, match="prompt_token_ids"):
        llm.generate([[5, -1]], SamplingParams())
    with pytest.raises(InvalidParameterError, match="sampling_params"):
        llm.generate(["a", "b"], [SamplingParams()])


def test_a_bad_prompt_in_a_batch_queues_nothing_and_engine_goes_on(llm):
    with pytest.raises(PromptTooLongError):
        llm.generate(["fine", list(range(100, 500))], SamplingParams(max_tokens=4))
    stats = llm.engine.stats()
    assert stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks
    out = llm.generate(["still serving"], SamplingParams(max_tokens=4, temperature=0.0))
    assert len(out[0].token_ids) == 4


def test_duplicate_request_id(llm):
    engine = llm.engine
    engine.add_request("same", "hello", SamplingParams(max_tokens=3))
    with pytest.raises(InvalidParameterError, match="request_id"):
        engine.add_request("same", "hello", SamplingParams(max_tokens=3))
    while engine.has_unfinished_requests():
        engine.step()


def test_unknown_directory_and_unsupported_architecture(tmp_path):
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        LLM(str(tmp_path / "nope"))
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                                                      "num_attention_heads": 2, "hidden_size": 8,
                                                      "intermediate_size": 8, "num_hidden_layers": 1,
                                                      "vocab_size": 10}))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*not supported"):
        LLM(str(tmp_path))
