"""CPU steps pad their token count to a few sizes (runner.padded_count), so GEMM primitive caches,
compiled graphs and the heap see a bounded set of shapes. Padding must change no result."""
from __future__ import annotations

from helpers import mixed_prompts

from dashinfer_core import LLM, SamplingParams
from dashinfer_core.engine.runner import padded_count


def test_padded_count_is_a_small_set_that_covers_every_count():
    assert len({padded_count(n) for n in range(1, 513)}) <= 36
    for n in range(1, 2049):
        p = padded_count(n)
        assert p >= n and padded_count(p) == p  # a bucket pads to itself
        assert p - n < 8 or p - n <= n / 8  # little waste: a few rows, or under 1/8 past 64 rows


def test_bucketed_steps_give_the_same_tokens_and_see_only_bucket_shapes(tiny_models, monkeypatch):
    from dashinfer_core.layers import linear as linear_mod
    rows_seen = set()
    real_linear, real_packed = linear_mod.linear, linear_mod.packed_linear

    def recording_linear(x, weight, bias=None):
        rows_seen.add(x.reshape(-1, x.shape[-1]).shape[0])
        return real_linear(x, weight, bias)

    def recording_packed(x, weight, bias=None):  # fp32 weights are packed where oneDNN allows (packed_linear)
        rows_seen.add(x.reshape(-1, x.shape[-1]).shape[0])
        return real_packed(x, weight, bias)

    prompts = mixed_prompts(12, min_len=3, max_len=70, seed=5)
    params = [SamplingParams(max_tokens=6 + i % 5, temperature=0.0 if i % 2 else 0.8, seed=i, ignore_eos=True)
              for i in range(len(prompts))]
    settings = dict(dtype="float32", device="cpu", kv_cache_memory=8 << 20, max_num_batched_tokens=64,
                    block_size=16)
    plain = LLM(str(tiny_models["llama"]), bucket_batch_shapes=False, **settings)
    want = [o.token_ids for o in plain.generate(prompts, params)]
    bucketed = LLM(str(tiny_models["llama"]), **settings)
    monkeypatch.setattr(linear_mod, "linear", recording_linear)
    import dashinfer_core.models.llama as llama_mod
    monkeypatch.setattr(llama_mod, "linear", recording_linear)
    monkeypatch.setattr(linear_mod, "packed_linear", recording_packed)
    monkeypatch.setattr(llama_mod, "packed_linear", recording_packed)
    got = [o.token_ids for o in bucketed.generate(prompts, params)]
    assert got == want
    assert rows_seen and all(padded_count(r) == r for r in rows_seen), sorted(rows_seen)
    stats = bucketed.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    assert bucketed.score(prompts[0], chunk_tokens=5) == plain.score(prompts[0], chunk_tokens=5)
