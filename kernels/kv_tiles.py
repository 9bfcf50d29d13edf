"""Triton helpers shared by the decode and prefill attention kernels: load one cache block's K or V
tile of one KV head, dequantizing int8 / uint4 caches in registers (see kv_store_quant.py for their
layout), and fold that block into a running online softmax."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(data_ptr, scale_ptr, zero_ptr, block, kv_head, NUM_KV_HEADS: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KV_BITS: tl.constexpr,
                 GROUPS: tl.constexpr):
    """[BLOCK_SIZE, BLOCK_D]: the cache dtype when KV_BITS == 0, else float32 values (q - zero) * scale."""
    n = tl.arange(0, BLOCK_SIZE)
    d = tl.arange(0, BLOCK_D)
    rows = (block * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + n
    if KV_BITS == 0:
        return tl.load(data_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=(d < HEAD_DIM)[None, :], other=0.0)
    else:
        if KV_BITS == 8:
            q = tl.load(data_ptr + rows[:, None] * HEAD_DIM + d[None, :]).to(tl.float32)
        else:
            half = tl.arange(0, HEAD_DIM // 2)
            packed = tl.load(data_ptr + rows[:, None] * (HEAD_DIM // 2) + half[None, :])
            q = tl.reshape(tl.join(packed & 0x0F, packed >> 4), [BLOCK_SIZE, HEAD_DIM]).to(tl.float32)
        group = d // (HEAD_DIM // GROUPS)
        scale = tl.load(scale_ptr + rows[:, None] * GROUPS + group[None, :])
        zero = tl.load(zero_ptr + rows[:, None] * GROUPS + group[None, :])
        return (q - zero) * scale


@triton.jit
def online_softmax_block(q, m, l, acc, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, k_zero_ptr,
                         v_zero_ptr, block, kv_head, visible, scale, NUM_KV_HEADS: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         KV_BITS: tl.constexpr, KV_GROUPS: tl.constexpr, IEEE: tl.constexpr):
    """Attend the queries q [R, BLOCK_D] (float32 when IEEE) to cache block `block` of `kv_head`:
    scores outside `visible` ([R or 1, BLOCK_SIZE]) are masked, and the block is folded into the
    running max m [R], denominator l [R] and unnormalised output acc [R, BLOCK_D]. Returns the new
    (m, l, acc); the output is acc / l once every block is in."""
    k = load_kv_tile(k_cache_ptr, k_scale_ptr, k_zero_ptr, block, kv_head, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM,
                     BLOCK_D, KV_BITS, KV_GROUPS)
    v = load_kv_tile(v_cache_ptr, v_scale_ptr, v_zero_ptr, block, kv_head, NUM_KV_HEADS, BLOCK_SIZE, HEAD_DIM,
                     BLOCK_D, KV_BITS, KV_GROUPS)
    if KV_BITS != 0:  # dequantized in float32: back to the query's dtype for the dot
        k = k.to(q_ptr.dtype.element_ty)
        v = v.to(q_ptr.dtype.element_ty)
    if IEEE:
        s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m, tl.max(s, axis=1))
    alpha = tl.exp(m - m_new)
    p = tl.exp(s - m_new[:, None])
    l = l * alpha + tl.sum(p, axis=1)
    if IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v.to(tl.float32), input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l, acc
