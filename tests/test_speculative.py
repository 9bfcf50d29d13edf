"""Speculative decoding: the same output in fewer steps.

Greedy and seeded sampling give the same tokens with speculation on and off (verification draws each token
as plain decoding would); the empirical distribution of sampled tokens matches the model's exact one (a
chi-square test); mixed batches, stop strings inside an accepted run, preemption, guided decoding, n > 1,
logprobs and streaming; every KV block (the target's and the draft's) comes back; bad settings are refused
naming the field.
"""
from __future__ import annotations

import asyncio
import json
import shutil

import pytest
import torch

from dashinfer_core import LLM, AsyncEngine, EngineConfig, InvalidParameterError, SamplingParams
from dashinfer_core.engine.llm_engine import LLMEngine
from helpers import compare_greedy, hf_greedy, mixed_prompts

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "disable_by_batch_size": None}
COPY = ("Copy the following list exactly.\nList: apples, bananas, cherries, dates, elderberries, figs, grapes, "
        "honeydew melons, kiwis, lemons.\nCopy: apples, bananas,")
REPEAT = "Repeat after me: the cat sat on the mat, the cat sat on the mat, the cat"


def assert_all_blocks_free(llm: LLM) -> None:
    stats = llm.engine.stats()
    assert stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks
    speculator = llm.engine.speculator
    if speculator is not None and hasattr(speculator.proposer, "blocks"):
        blocks = speculator.proposer.blocks
        assert blocks.num_free_blocks == blocks.num_blocks and not speculator.proposer.mirrors


def outputs_of(results):
    return [[(c.token_ids, c.text, c.finish_reason, c.logprobs) for c in r.outputs] for r in results]


# ---- the embedded model, n-gram lookup ------------------------------------------------------------------
@pytest.fixture(scope="module")
def embedded():
    plain = LLM(dtype="float32", device="cpu", block_size=16)
    spec = LLM(dtype="float32", device="cpu", block_size=16, speculative=NGRAM)
    yield plain, spec
    plain.shutdown()
    spec.shutdown()


def test_ngram_greedy_matches_plain_decoding_with_fewer_steps(embedded):
    plain, spec = embedded
    prompts = [COPY, REPEAT, "Once upon a time, in a small village,"]
    params = SamplingParams(max_tokens=40, temperature=0.0)
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert outputs_of(got) == outputs_of(want)
    assert "elderberries, figs" in got[0].outputs[0].text
    # the copy prompt's answer repeats its input: most drafts are taken, and it needs fewer steps
    assert got[0].num_draft_tokens >= 8 and got[0].acceptance_rate > 0.6
    steps_before = (plain.engine.num_steps, spec.engine.num_steps)
    assert outputs_of(spec.generate([COPY], params)) == outputs_of(plain.generate([COPY], params))
    assert spec.engine.num_steps - steps_before[1] < 0.6 * (plain.engine.num_steps - steps_before[0])
    stats = spec.engine.stats()
    assert stats.spec_draft_tokens >= got[0].num_draft_tokens and stats.spec_accepted_tokens > 0
    assert stats.spec_acceptance_rate == pytest.approx(stats.spec_accepted_tokens / stats.spec_draft_tokens)
    assert_all_blocks_free(spec)


def test_seeded_sampling_n2_logprobs_and_stop_strings_are_unchanged(embedded):
    plain, spec = embedded
    prompts = [COPY, "Once upon a time", REPEAT]
    params = [SamplingParams(max_tokens=40, temperature=0.8, seed=7, logprobs=2, stop=["lemons"]),
              SamplingParams(max_tokens=30, temperature=0.0, logprobs=0),
              SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9, seed=3, n=2)]
    want, got = plain.generate(prompts, params), spec.generate(prompts, params)
    assert outputs_of(got) == outputs_of(want)
    assert got[0].outputs[0].finish_reason == "stop" and got[0].outputs[0].stop_reason == "lemons"
    assert len(got[0].outputs[0].logprobs) == len(got[0].outputs[0].token_ids)
    assert got[0].num_accepted_tokens > 0 and got[2].num_accepted_tokens > 0
    assert_all_blocks_free(spec)


@pytest.mark.parametrize("stop", [["dates"], ["honeydew"]])
def test_a_stop_string_inside_an_accepted_run(embedded, stop):
    plain, spec = embedded
    params = SamplingParams(max_tokens=40, temperature=0.0, stop=stop)
    want, got = plain.generate([COPY], params)[0], spec.generate([COPY], params)[0]
    assert outputs_of([got]) == outputs_of([want])
    assert got.outputs[0].finish_reason == "stop" and stop[0] not in got.outputs[0].text
    assert got.num_accepted_tokens > 0
    # max_tokens landing part-way through a run
    params = SamplingParams(max_tokens=7, temperature=0.0)
    want, got = plain.generate([COPY], params)[0], spec.generate([COPY], params)[0]
    assert outputs_of([got]) == outputs_of([want]) and len(got.outputs[0].token_ids) == 7
    assert got.outputs[0].finish_reason == "length"
    assert_all_blocks_free(spec)


def test_guided_drafts_are_checked_against_the_pattern(embedded):
    plain, spec = embedded
    # no commas allowed: drafts copied from the list are cut at the first comma
    for regex in (r"[a-z ,]{10,80}\.", r"[a-z ]{10,60}"):
        params = SamplingParams(max_tokens=40, temperature=0.0, regex=regex)
        want, got = plain.generate([COPY], params)[0], spec.generate([COPY], params)[0]
        assert outputs_of([got]) == outputs_of([want])
        assert got.num_draft_tokens > 0
    assert got.num_accepted_tokens > 0
    assert_all_blocks_free(spec)


def test_streaming_with_speculation(embedded, default_model_dir):
    plain, _ = embedded
    params = SamplingParams(max_tokens=40, temperature=0.0)
    want = plain.generate([COPY], params)[0]
    engine = AsyncEngine(EngineConfig(dtype="float32", device="cpu", block_size=16, speculative=NGRAM))

    async def collect():
        deltas, last = [], None
        async for out in engine.generate(COPY, params):
            deltas.append(out.outputs[0].delta_text)
            last = out
        return deltas, last
    try:
        deltas, last = asyncio.run(collect())
    finally:
        engine.shutdown()
    assert "".join(deltas) == last.text == want.outputs[0].text
    assert last.num_accepted_tokens > 0
    assert len(deltas) < len(last.outputs[0].token_ids)  # several tokens arrive in one step


# ---- tiny random models: draft models, mixed batches, preemption ------------------------------------------
@pytest.fixture(scope="module")
def tiny_other_draft(tiny_models, tmp_path_factory):
    """A draft that disagrees with the llama target now and then: its weights with noise added."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    target = tiny_models["llama"]
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for weight in (model.model.layers[1].mlp.down_proj.weight, model.model.layers[0].self_attn.v_proj.weight):
            weight.add_(torch.randn_like(weight) * weight.std() * 0.5)
    path = tmp_path_factory.mktemp("draft") / "llama-noisy"
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(target)).save_pretrained(str(path))
    return path


def tiny_llm(path, speculative=None, **options):
    return LLM(str(path), dtype="float32", device="cpu", block_size=16, speculative=speculative, **options)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_models_greedy_identical_with_every_method(tiny_models, tiny_other_draft, family):
    from transformers import AutoModelForCausalLM
    path = tiny_models[family]
    prompts = mixed_prompts(6, seed=5, max_len=40)
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    plain = tiny_llm(path)
    want = plain.generate(prompts, params)
    plain.shutdown()
    hf = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    assert compare_greedy(want[0].outputs[0].token_ids, hf_greedy(hf, prompts[0], 24)) in ("match", "tie")
    methods = {"self-draft": {"method": "draft", "model": str(path), "num_speculative_tokens": 3},
               "ngram": {**NGRAM, "prompt_lookup_min": 1}}
    if family == "llama":
        methods["other-draft"] = {"method": "draft", "model": str(tiny_other_draft), "num_speculative_tokens": 4}
    for name, config in methods.items():
        spec = tiny_llm(path, {**config, "disable_by_batch_size": None})
        got = spec.generate(prompts, params)
        assert outputs_of(got) == outputs_of(want), name
        drafts, accepted = sum(r.num_draft_tokens for r in got), sum(r.num_accepted_tokens for r in got)
        assert drafts > 0, name
        if name == "self-draft":  # the draft is the target: it proposes what the target picks
            assert accepted >= 0.9 * drafts
        if name == "other-draft":  # both paths: drafts taken and drafts rejected
            assert 0 < accepted < drafts
        assert_all_blocks_free(spec)
        spec.shutdown()


def test_mixed_batches_with_prefill_chunks_and_plain_decodes(tiny_models):
    """Speculating sequences, plain decodes (max_tokens leaves no room for drafts) and a long prompt's
    prefill chunks share steps."""
    path = tiny_models["llama"]
    prompts = mixed_prompts(5, seed=9, min_len=10, max_len=30) + mixed_prompts(1, seed=10, min_len=300, max_len=300)
    params = [SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)] * 5 + \
        [SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True)]
    params[1] = SamplingParams(max_tokens=30, temperature=0.9, seed=11, ignore_eos=True)

    def run(speculative):
        llm = tiny_llm(path, speculative, max_num_batched_tokens=64)
        engine, batches = llm.engine, []
        execute = engine.runner.execute

        def recording(batch, rows, pool=()):
            batches.append([(len(s.spec_tokens), n) for s, n in zip(batch.seqs, batch.num_new_tokens)])
            return execute(batch, rows, pool)
        engine.runner.execute = recording
        for i, (prompt, p) in enumerate(zip(prompts[:5], params[:5])):
            engine.add_request(str(i), prompt, p)
        for _ in range(4):
            engine.step()
        engine.add_request("long", prompts[5], params[5])  # arrives while the others decode
        results = {}
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.finished:
                    results[out.request_id] = out
        assert_all_blocks_free(llm)
        llm.shutdown()
        return [results[k] for k in sorted(results)], batches

    want, _ = run(None)
    got, batches = run({"method": "draft", "model": str(path), "num_speculative_tokens": 3,
                        "disable_by_batch_size": None})
    assert outputs_of(got) == outputs_of(want)
    mixed = [b for b in batches if any(k for k, _ in b) and any(k == 0 and n > 1 for k, n in b)]
    assert mixed, "no step verified drafts beside a prefill chunk"


def test_preemption_mid_speculation(tiny_models):
    path = tiny_models["llama"]
    prompts = mixed_prompts(6, seed=3, min_len=20, max_len=40)
    params = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
    # 16 blocks of 16 tokens: six sequences of up to 88 tokens cannot all stay
    options = dict(kv_cache_memory=16 * 2 * 2 * 16 * 2 * 16 * 4, max_num_seqs=6)
    plain = tiny_llm(path, **options)
    want = plain.generate(prompts, params)
    plain.shutdown()
    spec = tiny_llm(path, {"method": "draft", "model": str(path), "num_speculative_tokens": 4,
                           "disable_by_batch_size": None}, **options)
    got = spec.generate(prompts, params)
    assert outputs_of(got) == outputs_of(want)
    assert spec.engine.stats().num_preemptions > 0
    assert sum(r.num_accepted_tokens for r in got) > 0
    assert_all_blocks_free(spec)
    spec.shutdown()


def test_disable_by_batch_size(tiny_models):
    path = tiny_models["llama"]
    spec = tiny_llm(path, {"method": "draft", "model": str(path), "num_speculative_tokens": 2,
                           "disable_by_batch_size": 2})
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    crowd = spec.generate(mixed_prompts(3, seed=1), params)
    assert sum(r.num_draft_tokens for r in crowd) == 0  # three decode at once: past the limit
    pair = spec.generate(mixed_prompts(2, seed=1), params)
    assert all(r.num_draft_tokens > 0 for r in pair)
    spec.shutdown()


# ---- the output distribution ------------------------------------------------------------------------------
def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Goodness of fit of observed counts to probabilities (categories expected < 5 times pooled)."""
    total = counts.sum()
    expected = probs * total
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    stat = ((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), stat.double() / 2))


def cycle_successor(token: int) -> int:
    """Tokens 4c..4c+3 form a cycle: 8 -> 9 -> 10 -> 11 -> 8."""
    return token - token % 4 + (token + 1) % 4


@pytest.fixture(scope="module")
def small_vocab_model(tmp_path_factory):
    """A 2-layer random model over 48 tokens that mostly (p ~ 0.6) continues each token with its cycle successor,
    so drafts are often taken and often rejected; its layers, scaled down, still make the context matter."""
    import transformers
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                                   initializer_range=0.6, tie_word_embeddings=False, eos_token_id=2, bos_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.005)
            layer.mlp.down_proj.weight.mul_(0.005)
        unit = model.model.embed_tokens.weight / model.model.embed_tokens.weight.norm(dim=1, keepdim=True)
        successor = torch.tensor([cycle_successor(t) for t in range(48)])
        model.lm_head.weight[successor] = unit * (5.5 / 32 ** 0.5)
    path = tmp_path_factory.mktemp("small-vocab") / "llama48"
    model.save_pretrained(str(path))
    return path, model


def exact_two_token_marginals(model, prompt: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """P(first output token) and P(second output token), summed over the first, from HF transformers."""
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt])).logits[0, -1].double(), -1)
        vocab = first.shape[0]
        pairs = torch.tensor([prompt + [t] for t in range(vocab)])
        second = torch.softmax(model(pairs).logits[:, -1].double(), -1)
    return first, first @ second


@pytest.mark.parametrize("method", ["draft", "ngram"])
def test_sampled_distribution_is_unchanged(small_vocab_model, method):
    path, model = small_vocab_model
    prompt = [8, 9, 10, 11, 8, 9, 10]
    config = {"method": "draft", "model": str(path), "num_speculative_tokens": 3} if method == "draft" else \
        {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    llm = LLM(str(path), dtype="float32", device="cpu", block_size=16, skip_tokenizer_init=True, max_num_seqs=256,
              max_num_batched_tokens=2048, speculative={**config, "disable_by_batch_size": None})
    samples = 3000
    params = [SamplingParams(max_tokens=4, temperature=1.0, seed=1000 + i, ignore_eos=True) for i in range(samples)]
    outs = llm.generate([prompt] * samples, params)
    drafts, accepted = sum(o.num_draft_tokens for o in outs), sum(o.num_accepted_tokens for o in outs)
    assert drafts > samples and accepted > 0.1 * drafts, (drafts, accepted)  # speculation did run, and took drafts
    assert_all_blocks_free(llm)
    llm.shutdown()
    first, second = exact_two_token_marginals(model, prompt)
    tokens = torch.tensor([o.outputs[0].token_ids[:2] for o in outs])
    for position, probs in ((0, first), (1, second)):
        counts = torch.bincount(tokens[:, position], minlength=probs.shape[0]).double()
        assert chi_square_p(counts, probs) > 1e-3, position


def test_chi_square_check_detects_a_wrong_distribution(small_vocab_model):
    """The test above can fail: samples from a distribution tempered differently are rejected."""
    path, model = small_vocab_model
    first, _ = exact_two_token_marginals(model, [8, 9, 10, 11, 8, 9, 10])
    wrong = torch.softmax(first.log() / 1.3, -1)
    draws = torch.multinomial(wrong, 3000, replacement=True, generator=torch.Generator().manual_seed(0))
    assert chi_square_p(torch.bincount(draws, minlength=first.shape[0]).double(), first) < 1e-3


# ---- settings ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, field", [
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 17}, "speculative.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "speculative.num_speculative_tokens"),
    ({"method": "eagle", "num_speculative_tokens": 2}, "speculative.method"),
    ({"method": "ngram"}, "speculative.num_speculative_tokens"),
    ({"num_speculative_tokens": 2}, "speculative.method"),
    ({"method": "ngram", "num_speculative_tokens": 2, "lookahead": 3}, "speculative.lookahead"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 3, "prompt_lookup_max": 2},
     "speculative.prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "speculative.model"),
    ({"method": "draft", "num_speculative_tokens": 2}, "speculative.model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "disable_by_batch_size": 0}, "speculative.disable_by_batch_size"),
    ("ngram", "speculative"),
])
def test_bad_settings_name_the_field(value, field):
    with pytest.raises(InvalidParameterError) as err:
        EngineConfig(speculative=value)
    assert err.value.field == field


def test_a_draft_with_another_vocabulary_or_tokenizer_is_refused(tiny_models, small_vocab_model, tmp_path):
    target = tiny_models["llama"]
    with pytest.raises(InvalidParameterError, match="vocabulary") as err:
        LLMEngine(EngineConfig(model=str(target), device="cpu", speculative={
            "method": "draft", "model": str(small_vocab_model[0]), "num_speculative_tokens": 2}))
    assert err.value.field == "speculative.model"
    other = tmp_path / "other-tokenizer"
    shutil.copytree(target, other)
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(str(other))
    tokenizer.add_tokens(["<not-in-the-target>"])
    tokenizer.save_pretrained(str(other))
    with pytest.raises(InvalidParameterError, match="tokenizer") as err:
        LLMEngine(EngineConfig(model=str(target), device="cpu", speculative={
            "method": "draft", "model": str(other), "num_speculative_tokens": 2}))
    assert err.value.field == "speculative.model"


def test_the_command_line_takes_json():
    import argparse
    from dashinfer_core.engine_args import add_engine_args, engine_config_from_args
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--speculative", json.dumps({"method": "ngram", "num_speculative_tokens": 3})])
    config = engine_config_from_args(args)
    assert config.speculative.method == "ngram" and config.speculative.num_speculative_tokens == 3
    assert engine_config_from_args(parser.parse_args([])).speculative is None


def test_the_fastchat_worker_and_the_litellm_provider_take_it():
    config_json = json.dumps({"method": "draft", "model": "default", "quantization": "gguf",
                              "num_speculative_tokens": 3})
    worker = pytest.importorskip("dashinfer_fastchat.worker")
    args = worker.build_parser().parse_args(["--model-path", "default", "--speculative", config_json])
    config = worker.worker_engine_config(args)
    assert (config.speculative.method, config.speculative.model, config.speculative.num_speculative_tokens) == \
        ("draft", "default", 3)
    provider = pytest.importorskip("dashinfer_litellm.provider")
    engine_options, sampling = provider.split_params(
        {"speculative": {"method": "ngram", "num_speculative_tokens": 2}, "temperature": 0.0}, "default")
    assert engine_options == {"speculative": {"method": "ngram", "num_speculative_tokens": 2}}
    assert EngineConfig(**engine_options).speculative.num_speculative_tokens == 2
    assert "speculative" not in sampling
