"""Engine behaviour on the embedded model and tiny models: batch invariance, sampling, stops,
n > 1, logprobs, penalties, block accounting."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dashinfer_core import LLM, SamplingParams
from helpers import mixed_prompts

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", device="cpu", block_size=16, max_num_seqs=32)


@pytest.fixture(scope="module")
def tiny_llm(tiny_models):
    return LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=16, max_num_seqs=32)


def assert_all_blocks_free(engine):
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks, stats
    assert stats.num_running == stats.num_waiting == stats.num_requests == 0, stats


def test_chat_answers_capital(llm):
    out = llm.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0))[0]
    assert out.text == "The capital of France is Paris."
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.engine.eos_token_ids
    tok = llm.get_tokenizer()
    expected_prompt = tok.apply_chat_template(CAPITAL, tokenize=False, add_generation_prompt=True)
    assert tok.decode(out.prompt_token_ids) == expected_prompt
    assert_all_blocks_free(llm.engine)


def test_same_prompt_alone_and_in_full_batch(llm):
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = [f"Write a short sentence about the number {i}." for i in range(24)]
    target = "Tell me a fact about the ocean."
    alone = llm.generate(target, params)[0]
    batched = llm.generate(prompts[:12] + [target] + prompts[12:], params)[12]
    assert batched.token_ids == alone.token_ids
    assert batched.text == alone.text
    assert_all_blocks_free(llm.engine)


def test_seeded_sampling_reproduces_whatever_the_batch(llm):
    params = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = "Once upon a time"
    alone = llm.generate(prompt, params)[0]
    others = [SamplingParams(max_tokens=8 + i, temperature=0.8, seed=i) for i in range(6)]
    batch = llm.generate([f"Story {i}:" for i in range(6)] + [prompt], others + [params])[-1]
    assert batch.token_ids == alone.token_ids
    different = llm.generate(prompt, SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, seed=99,
                                                    ignore_eos=True))[0]
    assert different.token_ids != alone.token_ids


def test_top_k_one_equals_greedy(llm):
    prompts = ["The weather today is", "My favourite food is", "In 1492,"]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0.0))
    topk1 = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=1.3, top_k=1, seed=5))
    assert [o.token_ids for o in topk1] == [o.token_ids for o in greedy]


def test_stop_strings_never_leak(llm):
    greedy = llm.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0))[0].text
    assert "Paris" in greedy
    out = llm.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0, stop=["Paris", "Berlin"]))[0]
    assert out.text == greedy[: greedy.index("Paris")]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == "Paris"
    # A stop string that starts mid-token and spans tokens.
    out = llm.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0, stop=["ce is Pa"]))[0]
    assert out.text == greedy[: greedy.index("ce is Pa")]
    kept = llm.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0, stop=["Paris"],
                                            include_stop_str_in_output=True))[0]
    assert kept.text == greedy[: greedy.index("Paris") + len("Paris")]
    assert_all_blocks_free(llm.engine)


def test_stop_token_ids_and_max_tokens(llm):
    greedy = llm.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0))[0]
    stop_id = greedy.token_ids[3]
    out = llm.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0, stop_token_ids=[stop_id]))[0]
    assert out.token_ids == greedy.token_ids[:4]
    assert out.finish_reason == "stop" and out.outputs[0].stop_reason == stop_id
    short = llm.chat(CAPITAL, SamplingParams(max_tokens=3, temperature=0.0))[0]
    assert short.token_ids == greedy.token_ids[:3] and short.finish_reason == "length"
    ignored = llm.chat(CAPITAL, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))[0]
    assert len(ignored.token_ids) == 12 and ignored.finish_reason == "length"
    assert ignored.token_ids[:len(greedy.token_ids)] == greedy.token_ids[:12]


def test_min_tokens_bans_eos(llm):
    greedy = llm.chat(CAPITAL, SamplingParams(max_tokens=32, temperature=0.0))[0]
    n = len(greedy.token_ids)  # ends with EOS
    out = llm.chat(CAPITAL, SamplingParams(max_tokens=n + 5, min_tokens=n + 2, temperature=0.0))[0]
    assert len(out.token_ids) >= n + 2
    assert all(t not in llm.engine.eos_token_ids for t in out.token_ids[: n + 2])


def test_max_model_len_ends_with_length(default_model_dir):
    llm = LLM(dtype="float32", device="cpu", max_model_len=40, block_size=16)
    prompt = list(range(100, 130))
    out = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    assert len(prompt) + len(out.token_ids) == 40
    assert out.finish_reason == "length"


def test_n_completions_share_the_prompt_blocks(llm):
    engine = llm.engine
    params = SamplingParams(n=3, max_tokens=10, temperature=1.0, seed=7, ignore_eos=True)
    prompt = "A list of fruits: apples, " * 6  # several blocks of prompt
    engine.add_request("n3", prompt, params)
    shared_seen = False
    while engine.has_unfinished_requests():
        engine.step()
        request = engine.requests.get("n3")
        if request and len(request.sequences) == 3:
            tables = [s.block_table for s in request.sequences]
            first_block = tables[0][0]
            shared_seen |= all(t[0] == first_block for t in tables)
            assert engine.scheduler.block_manager.ref_counts[first_block] >= 2
    assert shared_seen
    assert_all_blocks_free(engine)
    out = llm.generate(prompt, params)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3  # independent samples
    again = llm.generate(prompt, params)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]
    greedy = llm.generate(prompt, SamplingParams(n=2, max_tokens=10, temperature=0.0))[0]
    assert greedy.outputs[0].token_ids == greedy.outputs[1].token_ids


def test_logprobs_match_hf(tiny_models, tiny_llm):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.float32).eval()
    prompt = mixed_prompts(1, seed=3)[0]
    out = tiny_llm.generate(prompt, SamplingParams(max_tokens=6, temperature=0.0, logprobs=3))[0]
    comp = out.outputs[0]
    assert len(comp.logprobs) == 6
    ids = torch.tensor([prompt + comp.token_ids])
    with torch.no_grad():
        ref = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    for step, (token, entry) in enumerate(zip(comp.token_ids, comp.logprobs)):
        row = ref[len(prompt) - 1 + step]
        top = row.topk(3)
        assert list(entry)[0] == token
        assert set(entry) == set(top.indices.tolist()) | {token}
        for tok, lp in entry.items():
            assert abs(lp - row[tok].item()) < 1e-4
    assert abs(comp.cumulative_logprob - sum(e[t] for t, e in zip(comp.token_ids, comp.logprobs))) < 1e-4


def test_repetition_penalty_matches_hf(tiny_models, tiny_llm):
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.float32).eval()
    for prompt in mixed_prompts(3, max_len=20, seed=11):
        out = tiny_llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.5,
                                                       ignore_eos=True))[0]
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5,
                          pad_token_id=0, eos_token_id=None)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_presence_and_frequency_penalties_discourage_repeats(llm):
    prompt = "hello hello hello hello hello hello hello"
    plain = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True))[0]
    penalized = llm.generate(prompt, SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True,
                                                    frequency_penalty=2.0, presence_penalty=2.0))[0]
    def most_repeated(ids):
        return max(ids.count(t) for t in set(ids))
    assert len(set(penalized.token_ids)) > len(set(plain.token_ids))
    assert most_repeated(penalized.token_ids) < most_repeated(plain.token_ids)


def test_kept_logits_buffer_gives_the_same_tokens_and_is_reused(tiny_llm, monkeypatch):
    """Decode logits past KEPT_LOGITS_MIN_BYTES go into one kept tensor (a fresh one that large is mapped and
    unmapped every step); lowered to 0 here so every decode step takes that route: same greedy tokens. A packed
    LM head (untied, fp32 where oneDNN packs it) fills the kept tensor in row chunks: the same logits, bit for bit,
    as one product, a short last chunk included."""
    from dashinfer_core.engine import runner as runner_module
    from dashinfer_core.models import llama as llama_module
    prompts = mixed_prompts(6, min_len=3, max_len=30, seed=7)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    runner = tiny_llm.engine.runner
    model = runner.model
    fresh = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    assert runner._logits_buffer is None  # tiny logits: below the threshold, fresh tensors
    vocab = tiny_llm.engine.vocab_size
    monkeypatch.setattr(llama_module, "PACKED_HEAD_CHUNK_BYTES", 4 * vocab * 4)  # 4 rows a chunk
    hidden = torch.randn(11, model.embed_tokens.shape[1], generator=torch.Generator().manual_seed(3))
    out = torch.full((11, vocab), float("nan"))
    with torch.inference_mode():
        assert model.compute_logits(hidden, out=out) is out
        assert torch.equal(out, model.compute_logits(hidden))
    monkeypatch.setattr(runner_module, "KEPT_LOGITS_MIN_BYTES", 0)
    kept = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    buffer = runner._logits_buffer
    assert buffer is not None and buffer.shape[1] == tiny_llm.engine.vocab_size
    assert kept == fresh
    again = [o.token_ids for o in tiny_llm.generate(prompts, params)]
    assert again == fresh and runner._logits_buffer is buffer  # the same tensor, not a new one per run
    monkeypatch.undo()
    runner._logits_buffer = None
    assert_all_blocks_free(tiny_llm.engine)


def test_priority_runs_first(tiny_llm):
    engine = tiny_llm.engine
    engine.scheduler.max_num_seqs, saved = 1, engine.scheduler.max_num_seqs
    try:
        for i in range(3):
            engine.add_request(f"low{i}", [100 + i] * 5, SamplingParams(max_tokens=2), priority=5)
        engine.add_request("high", [200] * 5, SamplingParams(max_tokens=2), priority=-1)
        order = []
        while engine.has_unfinished_requests():
            order += [o.request_id for o in engine.step() if o.finished]
        assert order[0] == "high"
    finally:
        engine.scheduler.max_num_seqs = saved
    assert_all_blocks_free(engine)
