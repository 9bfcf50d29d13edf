"""Every Triton kernel against its plain-torch reference on fresh random inputs. On the CPU they run
under TRITON_INTERPRET=1 in float32 with small shapes; benchmarks/gpu_check.sh runs the same tests on
CUDA (DASHINFER_TEST_DEVICE=cuda) in bfloat16 and float16 at realistic sizes. Outputs are poisoned
with NaN before each call so an element the kernel fails to write fails the comparison."""
from __future__ import annotations

import os
import random

import pytest
import torch

from dashinfer_kernels.kv_store import kv_store, kv_store_ref
from dashinfer_kernels.paged_decode_attention import paged_decode_attention, paged_decode_attention_ref
from dashinfer_kernels.paged_prefill_attention import paged_prefill_attention, paged_prefill_attention_ref
from dashinfer_kernels.rmsnorm import rmsnorm, rmsnorm_ref
from dashinfer_kernels.rotary import rotary_inplace, rotary_ref
from dashinfer_kernels.silu_mul import silu_mul, silu_mul_ref
from dashinfer_kernels.token_bitmask import apply_token_bitmask, apply_token_bitmask_ref

DEVICE = os.environ.get("DASHINFER_TEST_DEVICE", "cpu")
ON_GPU = DEVICE != "cpu"
DTYPES = [torch.bfloat16, torch.float16] if ON_GPU else [torch.float32]
# Realistic sizes on a GPU, interpreter-sized on the CPU.
SCALE = 8 if ON_GPU else 1


def tol(dtype):
    return dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=2e-5, rtol=2e-5)


def random_cache(num_blocks, num_kv_heads, block_size, head_dim, dtype):
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return (torch.randn(shape, device=DEVICE).to(dtype), torch.randn(shape, device=DEVICE).to(dtype))


def random_block_tables(lens, block_size, num_blocks):
    """Disjoint random blocks per sequence, padded with 0."""
    need = [-(-n // block_size) for n in lens]
    pool = random.sample(range(num_blocks), sum(need))
    width = max(need)
    tables = torch.zeros(len(lens), width, dtype=torch.int32)
    at = 0
    for i, k in enumerate(need):
        tables[i, :k] = torch.tensor(pool[at:at + k], dtype=torch.int32)
        at += k
    return tables.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 32])
def test_kv_store(dtype, block_size):
    torch.manual_seed(0)
    num_blocks, hkv, d, t = 12, 3, 64, 40
    k_cache, v_cache = random_cache(num_blocks, hkv, block_size, d, dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    qkv = torch.randn(t, 5 * hkv, d, device=DEVICE).to(dtype)  # k, v as strided views of a fused tensor
    k, v = qkv[:, hkv:2 * hkv], qkv[:, 2 * hkv:3 * hkv]
    slots = torch.tensor(random.sample(range(num_blocks * block_size), t), device=DEVICE)
    slots[::7] = -1
    kv_store(k, v, k_cache, v_cache, slots)
    kv_store_ref(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


DECODE_SHAPES = [  # (lens, num_heads, num_kv_heads, head_dim, block_size, num_splits)
    ([5, 33, 17, 64], 4, 4, 64, 16, 1),
    ([100, 1, 31, 32], 6, 2, 64, 32, 1),
    ([70, 150, 9], 6, 2, 128, 16, 4),
    ([257, 3], 3, 1, 64, 32, 8),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens, hq, hkv, d, bs, splits", DECODE_SHAPES)
def test_paged_decode_attention(dtype, lens, hq, hkv, d, bs, splits):
    torch.manual_seed(1)
    random.seed(1)
    lens = [n * SCALE for n in lens]
    num_blocks = sum(-(-n // bs) for n in lens) + 5
    k_cache, v_cache = random_cache(num_blocks, hkv, bs, d, dtype)
    tables = random_block_tables(lens, bs, num_blocks)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), hq, d, device=DEVICE).to(dtype)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, d ** -0.5, num_splits=splits, out=out)
    ref = paged_decode_attention_ref(q, k_cache, v_cache, tables, seq_lens, d ** -0.5)
    torch.testing.assert_close(out, ref, **tol(dtype))


PREFILL_SHAPES = [  # (query lens, cached prefix lens, num_heads, num_kv_heads, head_dim, block_size)
    ([7, 20, 1], [0, 0, 0], 4, 4, 64, 16),
    ([9, 3, 30], [40, 16, 5], 6, 2, 64, 32),
    ([17, 5], [33, 100], 6, 2, 128, 16),
    ([40], [0], 3, 1, 64, 32),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("q_lens, prefixes, hq, hkv, d, bs", PREFILL_SHAPES)
def test_paged_prefill_attention(dtype, q_lens, prefixes, hq, hkv, d, bs):
    torch.manual_seed(2)
    random.seed(2)
    q_lens = [n * SCALE for n in q_lens]
    prefixes = [n * SCALE for n in prefixes]
    lens = [a + b for a, b in zip(q_lens, prefixes)]
    num_blocks = sum(-(-n // bs) for n in lens) + 3
    k_cache, v_cache = random_cache(num_blocks, hkv, bs, d, dtype)
    tables = random_block_tables(lens, bs, num_blocks)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    starts = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    q = torch.randn(sum(q_lens), hq, d, device=DEVICE).to(dtype)
    out = torch.full_like(q, float("nan"))
    block_m = 64 if ON_GPU else 16
    paged_prefill_attention(q, k_cache, v_cache, tables, seq_lens, starts, max(q_lens), d ** -0.5, out=out,
                            block_m=block_m)
    ref = paged_prefill_attention_ref(q, k_cache, v_cache, tables, seq_lens, starts, d ** -0.5)
    torch.testing.assert_close(out, ref, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden, with_residual", [(64, False), (576, True), (100, True)])
def test_rmsnorm(dtype, hidden, with_residual):
    torch.manual_seed(3)
    x = torch.randn(9 * SCALE, hidden, device=DEVICE).to(dtype)
    residual = torch.randn_like(x) if with_residual else None
    weight = torch.randn(hidden, device=DEVICE).to(dtype)
    ref_out, ref_res = rmsnorm_ref(x, weight, 1e-5, residual)
    res_in = residual.clone() if with_residual else None
    out = torch.full_like(x, float("nan"))
    rmsnorm(x, weight, 1e-5, residual=res_in, out=out)
    torch.testing.assert_close(out, ref_out, **tol(dtype))
    if with_residual:
        torch.testing.assert_close(res_in, ref_res, **tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hq, hkv, d", [(4, 4, 64), (9, 3, 64), (6, 2, 128)])
def test_rotary_inplace(dtype, hq, hkv, d):
    torch.manual_seed(4)
    from dashinfer_core.layers.rotary import RotaryEmbedding
    rope = RotaryEmbedding(d, 4096, 10000.0, {"rope_type": "default"}, dtype).to(DEVICE)
    t = 11 * SCALE
    qkv = torch.randn(t, hq + 2 * hkv, d, device=DEVICE).to(dtype)
    positions = torch.randint(0, 4096, (t,), device=DEVICE)
    q, k = qkv[:, :hq], qkv[:, hq:hq + hkv]
    q_ref = rotary_ref(q, rope.cos_cache, rope.sin_cache, positions)
    k_ref = rotary_ref(k, rope.cos_cache, rope.sin_cache, positions)
    v_before = qkv[:, hq + hkv:].clone()
    rotary_inplace(q, k, rope.cos_cache, rope.sin_cache, positions)
    torch.testing.assert_close(q, q_ref, **tol(dtype))
    torch.testing.assert_close(k, k_ref, **tol(dtype))
    assert torch.equal(qkv[:, hq + hkv:], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("inter", [64, 1536, 100])
def test_silu_mul(dtype, inter):
    torch.manual_seed(5)
    gate_up = torch.randn(7 * SCALE, 2 * inter, device=DEVICE).to(dtype)
    out = torch.full((gate_up.shape[0], inter), float("nan"), device=DEVICE, dtype=dtype)
    silu_mul(gate_up, out=out, block=64)
    torch.testing.assert_close(out, silu_mul_ref(gate_up), **tol(dtype))


@pytest.mark.parametrize("vocab, with_rows", [(100, False), (1000, True), (4099, True)])
def test_token_bitmask(vocab, with_rows):
    torch.manual_seed(6)
    batch = 5
    logits = torch.randn(batch, vocab, device=DEVICE)
    words = -(-vocab // 32)
    bitmask = torch.randint(-2**31, 2**31 - 1, (batch, words), dtype=torch.int32, device=DEVICE)
    rows = torch.tensor([0, 3], device=DEVICE, dtype=torch.int32) if with_rows else None
    ref = logits.clone()
    apply_token_bitmask_ref(ref, bitmask, rows)
    apply_token_bitmask(logits, bitmask, rows, block=256)
    assert torch.equal(logits, ref)
    if with_rows:
        assert torch.isfinite(logits[1]).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bits, group, m, n, k", [(8, None, 5, 48, 64), (8, 32, 17, 40, 96), (4, None, 3, 64, 64),
                                                  (4, 32, 9, 33, 96), (4, 16, 2, 24, 50), (8, None, 4, 16, 100)])
def test_dequant_gemm(dtype, bits, group, m, n, k):
    from dashinfer_core.quant.weights import quantize
    from dashinfer_kernels.dequant_gemm import dequant_gemm, dequant_gemm_ref
    torch.manual_seed(7)
    w = torch.randn(n * SCALE, k * SCALE, device=DEVICE)
    qw = quantize(w, bits, group)
    x = torch.randn(m * SCALE, k * SCALE, device=DEVICE).to(dtype)
    args = (qw.qweight, qw.scales, qw.zeros, bits, qw.group_size, n * SCALE, k * SCALE)
    out = dequant_gemm(x, *args)
    ref = dequant_gemm_ref(x, *args)
    # Half precision: the kernel rounds each dequantized weight to x's dtype before its dot and the
    # output to x's dtype after it, so allow ~1% of the output's range (an indexing bug is off by ~30%).
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else \
        dict(atol=1e-2 * ref.float().abs().max().item(), rtol=1e-2)
    torch.testing.assert_close(out, ref, **tol)


def quantized_caches(num_blocks, hkv, bs, d, bits):
    """Random K/V quantized into int8 / uint4 caches (via the torch reference store)."""
    from dashinfer_core.quant.kv import kv_groups
    from dashinfer_kernels.kv_store_quant import kv_store_quant_ref
    width, groups = (d if bits == 8 else d // 2), kv_groups(bits, d)
    data = [torch.zeros(num_blocks, hkv, bs, width, dtype=torch.uint8, device=DEVICE) for _ in range(2)]
    scales = [torch.zeros(num_blocks, hkv, bs, groups, device=DEVICE) for _ in range(2)]
    zeros = [torch.zeros(num_blocks, hkv, bs, groups, device=DEVICE) for _ in range(2)]
    slots = torch.arange(num_blocks * bs, device=DEVICE)
    k, v = (torch.randn(num_blocks * bs, hkv, d, device=DEVICE) for _ in range(2))
    kv_store_quant_ref(k, v, data[0], data[1], scales[0], scales[1], zeros[0], zeros[1], slots, bits)
    return data, scales, zeros


def dequantized(data, scales, zeros, bits):
    from dashinfer_core.quant.kv import dequantize_kv
    return [dequantize_kv(data[i], scales[i], zeros[i], bits) for i in range(2)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("d", [64, 128])
def test_kv_store_quant(bits, d):
    from dashinfer_core.quant.kv import kv_groups
    from dashinfer_kernels.kv_store_quant import kv_store_quant, kv_store_quant_ref
    torch.manual_seed(8)
    num_blocks, hkv, bs, t = 6, 2, 16, 30
    width, groups = (d if bits == 8 else d // 2), kv_groups(bits, d)

    def empty():
        return ([torch.zeros(num_blocks, hkv, bs, width, dtype=torch.uint8, device=DEVICE) for _ in range(2)],
                [torch.full((num_blocks, hkv, bs, groups), float("nan"), device=DEVICE) for _ in range(2)],
                [torch.full((num_blocks, hkv, bs, groups), float("nan"), device=DEVICE) for _ in range(2)])
    k = torch.randn(t, hkv, d, device=DEVICE) * 3
    v = torch.randn(t, hkv, d, device=DEVICE)
    slots = torch.tensor(random.sample(range(num_blocks * bs), t), device=DEVICE)
    slots[::5] = -1
    got, ref = empty(), empty()
    kv_store_quant(k, v, got[0][0], got[0][1], got[1][0], got[1][1], got[2][0], got[2][1], slots, bits)
    kv_store_quant_ref(k, v, ref[0][0], ref[0][1], ref[1][0], ref[1][1], ref[2][0], ref[2][1], slots, bits)
    keep = slots >= 0
    blocks, offsets = slots[keep] // bs, slots[keep] % bs
    for i, x in enumerate((k, v)):
        torch.testing.assert_close(got[1][i][blocks, :, offsets], ref[1][i][blocks, :, offsets])  # scales
        back = dequantized(got[0], got[1], got[2], bits)[i][blocks, :, offsets]
        step = got[1][i][blocks, :, offsets].repeat_interleave(d // groups, dim=-1)
        assert ((back - x[keep]).abs() <= step / 2 + 1e-5).all()  # within half a step of the input
        assert torch.isnan(got[1][i]).sum() == torch.isnan(ref[1][i]).sum()  # skipped slots untouched


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("hq, hkv, d, bs, splits", [(6, 2, 64, 16, 1), (4, 4, 128, 32, 4)])
def test_paged_attention_on_quantized_cache(bits, hq, hkv, d, bs, splits):
    torch.manual_seed(9)
    random.seed(9)
    lens = [n * SCALE for n in (37, 5, 70)]
    num_blocks = sum(-(-n // bs) for n in lens) + 2
    data, scales, zeros = quantized_caches(num_blocks, hkv, bs, d, bits)
    k_fp, v_fp = dequantized(data, scales, zeros, bits)
    tables = random_block_tables(lens, bs, num_blocks)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    quant = (bits, scales[0], scales[1], zeros[0], zeros[1])
    q = torch.randn(len(lens), hq, d, device=DEVICE)
    out = torch.full_like(q, float("nan"))
    paged_decode_attention(q, data[0], data[1], tables, seq_lens, d ** -0.5, num_splits=splits, out=out,
                           kv_quant=quant)
    torch.testing.assert_close(out, paged_decode_attention_ref(q, k_fp, v_fp, tables, seq_lens, d ** -0.5),
                               atol=2e-5, rtol=2e-5)
    q_lens = [3 * SCALE, 5 * SCALE, 1]  # each at most its sequence's length
    starts = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    qp = torch.randn(sum(q_lens), hq, d, device=DEVICE)
    outp = torch.full_like(qp, float("nan"))
    paged_prefill_attention(qp, data[0], data[1], tables, seq_lens, starts, max(q_lens), d ** -0.5, out=outp,
                            block_m=64 if ON_GPU else 16, kv_quant=quant)
    torch.testing.assert_close(outp, paged_prefill_attention_ref(qp, k_fp, v_fp, tables, seq_lens, starts, d ** -0.5),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("num_experts,top_k,tokens", [(4, 1, 13), (8, 2, 21), (8, 8, 5), (16, 2, 3)])
def test_fused_moe(num_experts, top_k, tokens):
    """Experts chosen by no token, blocks padded past the last pair, k from 1 to all experts."""
    from dashinfer_kernels.fused_moe import align_by_expert, fused_moe, fused_moe_ref
    g = torch.Generator().manual_seed(num_experts * 10 + top_k)
    hidden, inter = 32 * SCALE, 48 * SCALE
    for dtype in DTYPES:
        x = torch.randn(tokens * SCALE, hidden, generator=g).to(DEVICE, dtype)
        w13 = (torch.randn(num_experts, 2 * inter, hidden, generator=g) / hidden ** 0.5).to(DEVICE, dtype)
        w2 = (torch.randn(num_experts, hidden, inter, generator=g) / inter ** 0.5).to(DEVICE, dtype)
        scores = torch.rand(x.shape[0], num_experts, generator=g)
        if num_experts > top_k:
            scores[:, 0] = -1.0  # expert 0 is never chosen
        weights, ids = scores.softmax(-1).topk(top_k, dim=-1)
        ids, weights = ids.to(DEVICE), weights.to(DEVICE, dtype)
        sorted_ids, block_expert = align_by_expert(ids, num_experts, 16)
        used = set(ids.flatten().tolist())
        assert set(block_expert[block_expert >= 0].tolist()) == used  # a block per expert with tokens only
        real = sorted_ids[sorted_ids < ids.numel()]
        assert sorted(real.tolist()) == list(range(ids.numel()))  # every pair once
        torch.testing.assert_close(fused_moe(x, w13, w2, weights, ids), fused_moe_ref(x, w13, w2, weights, ids),
                                   **tol(dtype))


@pytest.mark.parametrize("num_slots,rank,tokens", [(1, 8, 5), (4, 16, 19), (8, 48, 7)])
def test_lora_shrink_expand(num_slots, rank, tokens):
    """Tokens of mixed slots and tokens with none (-1, left untouched); ranks not a power of two."""
    from dashinfer_kernels.lora import lora_expand, lora_expand_ref, lora_shrink, lora_shrink_ref
    g = torch.Generator().manual_seed(num_slots * 100 + rank)
    k, n = 40 * SCALE, 72 * SCALE
    slots = torch.randint(-1, num_slots, (tokens * SCALE,), generator=g)
    slots[0] = -1
    slots = slots.to(DEVICE, torch.int32)
    for dtype in DTYPES:
        x = torch.randn(slots.shape[0], k, generator=g).to(DEVICE, dtype)
        a = (torch.randn(num_slots, rank, k, generator=g) / k ** 0.5).to(DEVICE, dtype)
        b = torch.randn(num_slots, n, rank, generator=g).to(DEVICE, dtype)
        y = torch.randn(slots.shape[0], n, generator=g).to(DEVICE, dtype)
        s = lora_shrink(x, a, slots)
        torch.testing.assert_close(s, lora_shrink_ref(x, a, slots), **tol(dtype))
        want = lora_expand_ref(s, b, slots, y)
        got = lora_expand(s, b, slots, y.clone())
        torch.testing.assert_close(got, want, **tol(dtype))
        untouched = slots < 0
        assert torch.equal(got[untouched], y[untouched])
        # column slices, as a merged layer's second shard uses them: s[:, R/2:], y[:, 24:]
        half = rank // 2
        got = y.clone()
        lora_expand(s[:, half:], b[:, 24:, half:].contiguous(), slots, got[:, 24:])
        torch.testing.assert_close(got[:, 24:], lora_expand_ref(s[:, half:].contiguous(),
                                                                b[:, 24:, half:].contiguous(), slots, y[:, 24:]),
                                   **tol(dtype))
        assert torch.equal(got[:, :24], y[:, :24])
