"""TorchAttention's decode path: the compiled gather-in-the-reduction form and the index_select +
matmul form both against a per-query loop over the block table."""
from __future__ import annotations

import pytest
import torch

from dashinfer_core.cache.kv_cache import KVLayer
from dashinfer_core.layers.attention import AttentionMetadata, TorchAttention, torch_backend

HKV, GROUP, D, BS = 2, 3, 16, 4


def decode_case(lens: list[int], dtype: torch.dtype, seed: int = 0, keys_transposed: bool = False):
    """Decodes with context lengths `lens` (the new token's K/V included) in shuffled blocks."""
    g = torch.Generator().manual_seed(seed)
    max_blocks = -(-max(lens) // BS)
    num_blocks = len(lens) * max_blocks + 3
    data = torch.randn(2, num_blocks, HKV, BS, D, generator=g).to(dtype)
    tables = torch.randperm(num_blocks, generator=g)[: len(lens) * max_blocks].view(len(lens), max_blocks)
    slots = torch.tensor([tables[i, (n - 1) // BS].item() * BS + (n - 1) % BS for i, n in enumerate(lens)])
    q = torch.randn(len(lens), HKV * GROUP, D, generator=g).to(dtype)
    k = torch.randn(len(lens), HKV, D, generator=g).to(dtype)
    v = torch.randn(len(lens), HKV, D, generator=g).to(dtype)
    meta = AttentionMetadata.build(slots, torch.arange(len(lens) + 1, dtype=torch.int32),
                                   torch.tensor(lens, dtype=torch.int32), tables.int(), num_decodes=len(lens),
                                   query_start_loc_host=list(range(len(lens) + 1)), seq_lens_host=list(lens))
    if keys_transposed:  # each (block, head) chunk of K as [D, BS], in the same memory
        data[0] = data[0].transpose(-1, -2).contiguous().view(data[0].shape)
    return KVLayer(data=data, head_dim=D, keys_transposed=keys_transposed), meta, q, k, v


def logical_blocks(cache: KVLayer, blocks: torch.Tensor) -> torch.Tensor:
    """[2, len(blocks), HKV, BS, D] of an unquantized cache, whatever its K layout."""
    kv = cache.data[:, blocks]
    if cache.keys_transposed:
        kv = torch.stack((kv[0].view(len(blocks), HKV, D, BS).transpose(-1, -2), kv[1]))
    return kv


def loop_reference(cache: KVLayer, meta: AttentionMetadata, q: torch.Tensor, scale: float) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, n in enumerate(meta.seq_lens_host):
        blocks = meta.block_tables[i, : -(-n // BS)].long()
        kv = logical_blocks(cache, blocks).double().permute(0, 2, 1, 3, 4).reshape(2, HKV, -1, D)[:, :, :n]
        for h in range(HKV * GROUP):
            scores = kv[0, h // GROUP] @ q[i, h].double() * scale
            out[i, h] = torch.softmax(scores, 0) @ kv[1, h // GROUP]
    return out


def run(backend: TorchAttention, cache, meta, q, k, v, scale):
    cache = KVLayer(data=cache.data.clone(), head_dim=D, keys_transposed=cache.keys_transposed)  # store_kv writes
    backend.prepare(meta, cache)
    return backend.forward(q, k, v, cache, meta, scale), cache


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_compiled_decode_attention_matches_a_loop_reference(dtype, tol):
    # Lengths spread over several buckets, block boundaries included, and a lone long one; the cache in the
    # layout the engine gives this dtype (K transposed in 16 bits), which the matmul path (fused=False) reads too.
    lens = [1, 3, 4, 5, 8, 9, 17, 18, 30, 31, 32, 33, 64, 101]
    keys_transposed = TorchAttention(fused=True).keys_transposed(torch.device("cpu"), dtype, None)
    assert keys_transposed == (dtype == torch.bfloat16)
    cache, meta, q, k, v = decode_case(lens, dtype, keys_transposed=keys_transposed)
    scale = D ** -0.5
    fused, fused_cache = run(TorchAttention(fused=True), cache, meta, q, k, v, scale)
    assert torch_backend.compiled_decode.active, "the compiled path fell back to eager"
    plain, _ = run(TorchAttention(fused=False), cache, meta, q, k, v, scale)
    want = loop_reference(fused_cache, meta, q, scale)
    assert torch.allclose(fused.double(), want, atol=tol, rtol=tol)
    assert torch.allclose(plain.double(), want, atol=tol, rtol=tol)
    # Different batch and context sizes reuse the compiled code (sizes are dynamic) and stay right.
    cache, meta, q, k, v = decode_case([2, 7, 40], dtype, seed=1, keys_transposed=keys_transposed)
    fused, fused_cache = run(TorchAttention(fused=True), cache, meta, q, k, v, scale)
    assert torch.allclose(fused.double(), loop_reference(fused_cache, meta, q, scale), atol=tol, rtol=tol)


def test_transposed_keys_give_the_answer_of_the_row_layout(monkeypatch):
    """bf16/fp16 caches hold K as [D, block_size] per chunk: the same answer as the [block_size, D] form, with the
    GQA group unrolled (one sum per query head) and as a dimension (groups past MAX_UNROLLED_GROUP), all in fp32."""
    g = torch.Generator().manual_seed(3)
    n, nblk = 5, 3
    pool = torch.randn(2, 12, HKV, BS, D, generator=g).bfloat16()
    transposed = pool.clone()
    transposed[0] = pool[0].transpose(-1, -2).contiguous().view(pool[0].shape)
    queries = torch.randn(n, HKV, GROUP, D, generator=g)
    blocks = torch.randint(0, 12, (n, nblk), generator=g)
    lens = torch.tensor([1, 5, 17, 40, 48])
    bias = torch.zeros(n, nblk * BS).masked_fill_(torch.arange(nblk * BS)[None, :] >= lens[:, None], float("-inf"))
    rows = torch_backend.gathered_decode_attention(queries, pool, blocks, bias, D ** -0.5)
    unrolled = torch_backend.gathered_decode_attention(queries, transposed, blocks, bias, D ** -0.5,
                                                       keys_transposed=True)
    monkeypatch.setattr(torch_backend, "MAX_UNROLLED_GROUP", GROUP - 1)
    wide = torch_backend.gathered_decode_attention(queries, transposed, blocks, bias, D ** -0.5, keys_transposed=True)
    torch.testing.assert_close(unrolled, rows, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(wide, rows, atol=1e-5, rtol=1e-5)
    assert float(rows.abs().mean()) > 0.01
    # the wrong layout gives another answer: the flag is what reads the transposed chunks
    assert not torch.allclose(torch_backend.gathered_decode_attention(queries, transposed, blocks, bias, D ** -0.5),
                              rows, atol=1e-2)


@pytest.mark.parametrize("fused", [True, False])
def test_transposed_keys_are_stored_and_read_back_by_every_path(fused):
    """A K-transposed cache: the step's K lands in the columns of its chunks (V in rows), and decodes, a short
    chunk and a long prefill over a cached prefix (SDPA over the blocks read back) all match the loop."""
    lens = [20, 22, 45]
    cache, meta, q, k, v = decode_case(lens, torch.bfloat16, seed=6, keys_transposed=True)
    got, stored = run(TorchAttention(fused=fused), cache, meta, q, k, v, D ** -0.5)
    for i, n in enumerate(lens):
        block, offset = meta.block_tables[i, (n - 1) // BS].item(), (n - 1) % BS
        assert torch.equal(stored.data[0, block].view(HKV, D, BS)[:, :, offset], k[i])
        assert torch.equal(stored.data[1, block, :, offset], v[i])
    torch.testing.assert_close(got.double(), loop_reference(stored, meta, q, D ** -0.5), atol=2e-2, rtol=2e-2)
    # one sequence of 40 tokens whose last 12 are new (a long chunk: SDPA over the cached blocks)
    cache, _, _, _, _ = decode_case([40], torch.bfloat16, seed=7, keys_transposed=True)
    g = torch.Generator().manual_seed(8)
    table = torch.randperm(cache.data.shape[1], generator=g)[:10].view(1, 10)
    slots = torch.tensor([table[0, p // BS].item() * BS + p % BS for p in range(28, 40)])
    meta = AttentionMetadata.build(slots, torch.tensor([0, 12], dtype=torch.int32), torch.tensor([40], dtype=torch.int32),
                                   table.int(), num_decodes=0, query_start_loc_host=[0, 12], seq_lens_host=[40])
    q, k, v = (torch.randn(12, h, D, generator=g).bfloat16() for h in (HKV * GROUP, HKV, HKV))
    got, stored = run(TorchAttention(fused=fused), cache, meta, q, k, v, D ** -0.5)
    assert meta.backend_state.long_prefills == [0]
    kv = logical_blocks(stored, table[0, :10].long()).double().permute(0, 2, 1, 3, 4).reshape(2, HKV, -1, D)
    want = torch.empty(12, HKV * GROUP, D, dtype=torch.float64)
    for j in range(12):  # query j at position 28 + j sees keys 0..28 + j
        for h in range(HKV * GROUP):
            scores = kv[0, h // GROUP, :29 + j] @ q[j, h].double() * D ** -0.5
            want[j, h] = torch.softmax(scores, 0) @ kv[1, h // GROUP, :29 + j]
    torch.testing.assert_close(got.double(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("fused", [True, False])
def test_one_bucket_of_decodes_is_answered_in_place(fused):
    """Decodes whose contexts are within a bucket's growth of each other (most steps) are one bucket read and
    written in step order, without an index: same answer as the loop, K/V stored in their slots."""
    for lens in ([20, 22, 25], [9]):
        cache, meta, q, k, v = decode_case(lens, torch.float32, seed=2)
        backend = TorchAttention(fused=fused)
        got, stored = run(backend, cache, meta, q, k, v, D ** -0.5)
        (bucket,) = meta.backend_state.buckets
        assert bucket.token_idx is None and meta.backend_state.token_idx is None
        assert torch.allclose(got.double(), loop_reference(stored, meta, q, D ** -0.5), atol=2e-5, rtol=2e-5)
        for i, n in enumerate(lens):  # the new token's K/V went to its slot
            block, offset = meta.block_tables[i, (n - 1) // BS].item(), (n - 1) % BS
            assert torch.equal(stored.data[0, block, :, offset], k[i]) and torch.equal(stored.data[1, block, :, offset],
                                                                                        v[i])


@pytest.mark.parametrize("compiled", [True, False])
def test_buckets_are_split_from_the_longest_context_down(compiled):
    """Every bucket but the shortest spans at most BUCKET_GROWTH (its queries padded to its longest context, the
    padding is small where contexts are long); the shortest takes what is left; all queries answered once
    (a lone one twice). For the compiled path one bucket also while it pads to at most MAX_PADDING x the keys."""
    import random
    rng = random.Random(4)
    singles = 0
    compiled = compiled and torch_backend.compiled_decode.active  # no C++ compiler: the matmul path's rule
    for _ in range(40):
        lens = [rng.randint(1, 300) for _ in range(rng.randint(2, 40))]
        cache, meta, q, k, v = decode_case(lens, torch.float32, seed=9)
        TorchAttention(fused=compiled).prepare(meta, cache)
        buckets = meta.backend_state.buckets
        padded_within = len(lens) * max(lens) <= TorchAttention.MAX_PADDING * sum(lens)
        assert (len(buckets) == 1) == (max(lens) <= TorchAttention.BUCKET_GROWTH * min(lens)
                                       or (compiled and padded_within))
        if len(buckets) == 1:
            singles += max(lens) > TorchAttention.BUCKET_GROWTH * min(lens)
            continue
        spans = [[lens[i] for i in b.token_idx.tolist()] for b in buckets] if len(buckets) > 1 else [lens]
        assert len(buckets) <= TorchAttention.MAX_BUCKETS
        if len(buckets) > 1:
            assert sorted(i for b in buckets for i in set(b.token_idx.tolist())) == list(range(len(lens)))
        for span in spans[1:] if len(buckets) == TorchAttention.MAX_BUCKETS else spans:
            assert max(span) <= TorchAttention.BUCKET_GROWTH * min(span), spans
        assert [max(span) for span in spans] == sorted(max(span) for span in spans)
    assert singles > 0 if compiled else singles == 0  # the padding rule was met, and only on the compiled path


@pytest.mark.parametrize("fused", [True, False])
def test_a_lone_query_among_several_buckets_is_answered_as_two_rows(fused):
    """A bucket of one query would be a compiled variant of its own, first met mid-run: in a step of several
    buckets a lone query is answered twice (rows of its own token), the same as the loop; a step of one decode
    stays a single row."""
    lens = [10, 11, 12, 40, 41, 101]  # buckets: the three short ones, the two of ~40, and 101 alone
    cache, meta, q, k, v = decode_case(lens, torch.float32, seed=3)
    got, stored = run(TorchAttention(fused=fused), cache, meta, q, k, v, D ** -0.5)
    buckets = meta.backend_state.buckets
    assert len(buckets) == 3 and sorted(b.bias.shape[0] for b in buckets) == [2, 2, 3]
    assert buckets[-1].token_idx.tolist() == [5, 5]
    assert torch.allclose(got.double(), loop_reference(stored, meta, q, D ** -0.5), atol=2e-5, rtol=2e-5)
    cache, meta, q, k, v = decode_case([9], torch.float32, seed=4)
    got, stored = run(TorchAttention(fused=fused), cache, meta, q, k, v, D ** -0.5)
    (bucket,) = meta.backend_state.buckets
    assert bucket.bias.shape[0] == 1
    assert torch.allclose(got.double(), loop_reference(stored, meta, q, D ** -0.5), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_contexts_within_one_block_read_it_twice_the_copy_masked(fused):
    """No compiled variant for a single block: such a bucket lists its block twice, the second masked out."""
    for lens in ([3, 3, 3], [BS, BS], [1]):
        cache, meta, q, k, v = decode_case(lens, torch.float32, seed=5)
        got, stored = run(TorchAttention(fused=fused), cache, meta, q, k, v, D ** -0.5)
        (bucket,) = meta.backend_state.buckets
        assert bucket.blocks.shape == (len(lens), 2) and torch.equal(bucket.blocks[:, 0], bucket.blocks[:, 1])
        assert torch.isinf(bucket.bias[:, BS:]).all()
        assert torch.allclose(got.double(), loop_reference(stored, meta, q, D ** -0.5), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_host_rotary_tables_equal_the_torch_gather(dtype):
    """The CPU step gathers cos/sin in numpy from the host positions (padding position 0 included): the same
    values, shapes and strides as the torch gather, and tables re-read when the buffers are replaced."""
    import numpy as np

    from dashinfer_core.layers.rotary import RotaryEmbedding
    rope = RotaryEmbedding(64, 4096, 10000.0, {"rope_type": "default"}, dtype)
    positions = np.array([0, 4095, 17, 17, 1000, 0, 0], dtype=np.int64)
    for _ in range(2):
        got, want = rope.cos_sin_host(positions), rope.cos_sin(torch.from_numpy(positions))
        for g, w in zip(got, want):
            assert g.dtype == w.dtype and g.shape == w.shape == (7, 1, 32) and g.stride() == w.stride()
            assert torch.equal(g, w)
        rope.cos_cache = rope.cos_cache * 0.5  # a replaced buffer: the host tables follow it
        rope.sin_cache = rope.sin_cache * 0.5
