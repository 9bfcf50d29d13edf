"""Prefix cache: never changes the output, reuses what it should, evicts, swaps to the CPU tier and
back byte for byte, expires, and leaks nothing."""
from __future__ import annotations

import pytest
import torch

from dashinfer_core import LLM, SamplingParams
from dashinfer_core.cache.kv_cache import bytes_per_block
from dashinfer_core.cache.prefix_cache import PrefixCache
from helpers import mixed_prompts

BS = 16
BLOCK_BYTES = bytes_per_block(2, BS, 2, 16, torch.float32)  # the tiny llama's block


def make_llm(model_dir, prefix=True, blocks=200, cpu_blocks=0, **kw):
    return LLM(str(model_dir), dtype="float32", device="cpu", block_size=BS, enable_prefix_caching=prefix,
               kv_cache_memory=blocks * BLOCK_BYTES, cpu_cache_memory=cpu_blocks * BLOCK_BYTES, **kw)


def assert_no_leak(llm):
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_requests == 0
    bm = llm.engine.scheduler.block_manager
    assert not any(bm.ref_counts)
    assert len(bm.free_blocks) + len(bm.evictable) == bm.num_blocks


def workload():
    system = mixed_prompts(1, min_len=40, max_len=40, seed=100)[0]  # 2.5 blocks of shared prefix
    tails = mixed_prompts(8, min_len=1, max_len=30, seed=101)
    shared = [system + t for t in tails]
    base = mixed_prompts(1, min_len=47, max_len=47, seed=102)[0]
    all_but_last = [base + [t] for t in (500, 600, 700)]  # share everything but the last token
    multiples = [mixed_prompts(1, min_len=n, max_len=n, seed=103)[0] for n in (16, 32, 48)]
    multiples += [m[:] for m in multiples]  # and again, exactly
    return shared + all_but_last + multiples


@pytest.fixture(scope="module")
def reference(tiny_models):
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in make_llm(tiny_models["llama"], prefix=False).generate(workload(), params)]


def test_cache_on_gives_identical_tokens_and_hits(tiny_models, reference):
    llm = make_llm(tiny_models["llama"])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    first = llm.generate(workload(), params)
    second = llm.generate(workload(), params)  # now everything's full blocks are cached
    assert [o.token_ids for o in first] == reference
    assert [o.token_ids for o in second] == reference
    for prompt, out in zip(workload(), second):
        assert out.num_cached_tokens == (len(prompt) - 1) // BS * BS  # all full blocks but the last token's
    assert llm.engine.stats().prefix_hit_rate > 0.3
    assert_no_leak(llm)


def test_cache_with_preemption_and_n(tiny_models, reference):
    # 14 blocks for 17 sequences of up to ~5 blocks: preemption happens, with shared blocks in play.
    llm = make_llm(tiny_models["llama"], blocks=14, max_num_batched_tokens=48)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    outs = llm.generate(workload(), params)
    assert llm.engine.stats().num_preemptions > 0
    assert [o.token_ids for o in outs] == reference
    sampled = SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    prompt = workload()[0]
    off = make_llm(tiny_models["llama"], prefix=False).generate([prompt, prompt], sampled)
    on = llm.generate([prompt, prompt], sampled)
    assert [[c.token_ids for c in o.outputs] for o in on] == [[c.token_ids for c in o.outputs] for o in off]
    assert_no_leak(llm)


def test_eviction_under_a_tiny_budget(tiny_models, reference):
    llm = make_llm(tiny_models["llama"], blocks=10)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(workload(), params)] == reference
    stats = llm.engine.stats()
    assert stats.prefix_evictions > 0 and stats.prefix_cached_blocks <= 10
    assert_no_leak(llm)


def test_cpu_tier_round_trip_is_byte_identical(tiny_models, reference):
    llm = make_llm(tiny_models["llama"], blocks=12, cpu_blocks=64)
    engine = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompt = workload()[0]  # 40..70 tokens: at least 2 full blocks
    llm.generate(prompt, params)
    bm = engine.scheduler.block_manager
    first_blocks = [bm.cache.entries[k].device_block for k in list(bm.cache.entries)[:2]]
    saved = engine.runner.kv_cache.storage[:, :, first_blocks].clone()
    llm.generate(mixed_prompts(6, min_len=60, max_len=90, seed=7), params)  # push it out to the CPU
    assert engine.stats().prefix_swaps_out > 0
    out = llm.generate(prompt, params)[0]
    assert out.num_cpu_cached_tokens >= 2 * BS and engine.stats().prefix_swaps_in > 0
    assert out.token_ids == reference[0]
    entries = list(bm.cache.entries.values())
    back = [e for e in entries if e.key[0] is None and e.key[1] == tuple(prompt[:BS])][0]
    child = [e for e in entries if e.key[0] == back.uid][0]
    restored = engine.runner.kv_cache.storage[:, :, [back.device_block, child.device_block]]
    assert torch.equal(restored, saved)
    assert_no_leak(llm)


def test_ttl_expiry(tiny_models):
    llm = make_llm(tiny_models["llama"], prefix_cache_ttl=300.0)
    now = [1000.0]
    llm.engine.scheduler.block_manager.cache.clock = lambda: now[0]
    params = SamplingParams(max_tokens=2, temperature=0.0)
    prompt = workload()[0]
    llm.generate(prompt, params)
    now[0] += 299
    assert llm.generate(prompt, params)[0].num_cached_tokens > 0
    now[0] += 301
    assert llm.generate(prompt, params)[0].num_cached_tokens == 0
    assert llm.engine.scheduler.block_manager.stats.expired > 0
    assert_no_leak(llm)


def test_cache_salt_separates_requests(tiny_models):
    llm = make_llm(tiny_models["llama"])
    prompt = workload()[0]
    engine = llm.engine
    for request_id, salt in (("a", "tenant-1"), ("b", "tenant-2"), ("c", "tenant-1")):
        engine.add_request(request_id, prompt, SamplingParams(max_tokens=1), cache_salt=salt)
        while engine.has_unfinished_requests():
            outs = engine.step()
        assert outs[-1].num_cached_tokens == (0 if request_id != "c" else (len(prompt) - 1) // BS * BS)


def test_colliding_hashes_cannot_return_wrong_blocks(tiny_models, reference, monkeypatch):
    """Every key hashes alike here: lookups must still compare the full contents."""
    class Colliding(tuple):
        def __hash__(self):
            return 42

    monkeypatch.setattr(PrefixCache, "make_key", staticmethod(lambda p, t, e: Colliding((p, tuple(t), e))))
    llm = make_llm(tiny_models["llama"])
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(workload(), params)] == reference
    assert llm.engine.stats().prefix_hit_rate > 0.3


def test_embedded_model_shared_system_prompt(default_model_dir):
    system = [{"role": "system", "content": "You are a terse assistant. Answer in one short sentence. " * 6}]
    questions = ["What is the capital of France?", "What colour is the sky?", "How many legs has a cat?"]
    chats = [system + [{"role": "user", "content": q}] for q in questions]
    params = SamplingParams(max_tokens=16, temperature=0.0)
    off = LLM(dtype="float32", device="cpu", enable_prefix_caching=False).chat(chats, params)
    llm = LLM(dtype="float32", device="cpu", block_size=16)
    llm.chat(chats[:1], params)
    on = llm.chat(chats, params)
    assert [o.text for o in on] == [o.text for o in off]
    assert all(o.num_cached_tokens >= 64 for o in on)
