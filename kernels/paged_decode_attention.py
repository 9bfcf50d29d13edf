"""Paged decode attention ("flash decoding"): one query token per sequence against its whole
context in the paged KV cache, split along the context so that small batches still fill the GPU.

Layouts: q [B, Hq, D] (any row stride, head_dim contiguous); k_cache, v_cache
[num_blocks, Hkv, block_size, D]; block_tables [B, max_blocks] int32; seq_lens [B] int32 (context
length including the current token). Output [B, Hq, D].

Stage 1, grid (B, Hkv, num_splits): a program takes one sequence, one KV head and one slice of the
context, and serves all Hq / Hkv query heads of that KV head from the same K/V loads (GQA-aware). It
walks its slice one cache block at a time with an online softmax and writes a normalised partial
output plus its log-sum-exp. Stage 2, grid (B, Hq): merges the slices by their log-sum-exps.
With one split, stage 1 writes the output directly.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .kv_tiles import online_softmax_block


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, k_zero_ptr, v_zero_ptr,
                         block_tables_ptr, seq_lens_ptr, partial_ptr, lse_ptr,
                         out_ptr, scale, stride_qb, stride_qh, stride_bt, stride_ob, stride_oh,
                         NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, IEEE: tl.constexpr, KV_BITS: tl.constexpr,
                         KV_GROUPS: tl.constexpr):
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    num_blocks = tl.cdiv(seq_len, BLOCK_SIZE)
    blocks_per_split = tl.cdiv(num_blocks, NUM_SPLITS)
    first_block = split * blocks_per_split
    last_block = tl.minimum(first_block + blocks_per_split, num_blocks)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_SIZE)
    heads = kv_head * GROUP + g
    d_ok = d < HEAD_DIM
    q_mask = (g < GROUP)[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=q_mask, other=0.0)
    if IEEE:
        q = q.to(tl.float32)

    m = tl.full([GROUP_PAD], float("-inf"), dtype=tl.float32)
    l = tl.zeros([GROUP_PAD], dtype=tl.float32)
    acc = tl.zeros([GROUP_PAD, BLOCK_D], dtype=tl.float32)
    for j in range(first_block, last_block):
        block = tl.load(block_tables_ptr + b * stride_bt + j).to(tl.int64)
        m, l, acc = online_softmax_block(q, m, l, acc, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                                         k_zero_ptr, v_zero_ptr, block, kv_head,
                                         (j * BLOCK_SIZE + n < seq_len)[None, :], scale, NUM_KV_HEADS,
                                         BLOCK_SIZE, HEAD_DIM, BLOCK_D, KV_BITS, KV_GROUPS, IEEE)

    has_work = last_block > first_block
    safe_l = tl.where(l > 0, l, 1.0)
    out = acc / safe_l[:, None]
    if NUM_SPLITS == 1:
        o_ptrs = out_ptr + b * stride_ob + heads[:, None] * stride_oh + d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (b * NUM_KV_HEADS * GROUP + heads) * NUM_SPLITS + split
        tl.store(partial_ptr + row[:, None] * HEAD_DIM + d[None, :], out, mask=q_mask)
        lse = tl.where(has_work, m + tl.log(safe_l), float("-inf"))
        tl.store(lse_ptr + row, lse, mask=g < GROUP)


@triton.jit
def _decode_reduce_kernel(partial_ptr, lse_ptr, out_ptr, stride_ob, stride_oh, NUM_HEADS: tl.constexpr,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          SPLITS_PAD: tl.constexpr):
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, BLOCK_D)
    row = (b * NUM_HEADS + h) * NUM_SPLITS + s
    lse = tl.load(lse_ptr + row, mask=s < NUM_SPLITS, other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    w = tl.exp(lse - top)
    parts = tl.load(partial_ptr + row[:, None] * HEAD_DIM + d[None, :],
                    mask=(s < NUM_SPLITS)[:, None] & (d < HEAD_DIM)[None, :], other=0.0)
    total = tl.sum(w, axis=0)
    out = tl.sum(parts * w[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def choose_num_splits(batch: int, num_kv_heads: int, max_blocks: int, num_sms: int = 132) -> int:
    """About sixteen (sequence, KV head, split) programs per multiprocessor, so enough block loads are
    in flight to saturate memory (best of a sweep on an H200 at batch 64 x 4096: 32 splits, 2 warps);
    at most 64 splits and never more than the blocks a sequence can have."""
    splits = max(1, math.ceil(16 * num_sms / max(1, batch * num_kv_heads)))
    return int(min(triton.next_power_of_2(splits), 64, max(1, max_blocks)))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           num_splits: int = 1, out: torch.Tensor | None = None, num_warps: int = 2,
                           kv_quant: tuple | None = None) -> torch.Tensor:
    """kv_quant: None, or (bits, k_scales, v_scales, k_zeros, v_zeros) for int8 / uint4 caches."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    bits, k_s, v_s, k_z, v_z = kv_quant if kv_quant else (0, k_cache, v_cache, k_cache, v_cache)
    group = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(q)
    if batch == 0:
        return out
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    block_d = triton.next_power_of_2(head_dim)
    if num_splits > 1:
        partial = torch.empty(batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
        lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        partial = lse = out  # unused
    _decode_split_kernel[(batch, num_kv_heads, num_splits)](
        q, k_cache, v_cache, k_s, v_s, k_z, v_z, block_tables, seq_lens, partial, lse, out, scale,
        q.stride(0), q.stride(1), block_tables.stride(0), out.stride(0), out.stride(1),
        NUM_KV_HEADS=num_kv_heads, GROUP=group, GROUP_PAD=max(16, triton.next_power_of_2(group)),
        BLOCK_SIZE=block_size, HEAD_DIM=head_dim, BLOCK_D=block_d, NUM_SPLITS=num_splits,
        IEEE=q.dtype == torch.float32, KV_BITS=bits, KV_GROUPS=k_s.shape[-1] if bits else 1, num_warps=num_warps)
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            partial, lse, out, out.stride(0), out.stride(1), NUM_HEADS=num_heads, HEAD_DIM=head_dim,
            BLOCK_D=block_d, NUM_SPLITS=num_splits, SPLITS_PAD=triton.next_power_of_2(num_splits))
    return out


def paged_decode_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, scale) -> torch.Tensor:
    """Per sequence: gather its context from the blocks, softmax attention in float32."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(batch):
        length = int(seq_lens[b])
        blocks = block_tables[b, : -(-length // block_size)].long()
        keys = k_cache[blocks].transpose(1, 2).reshape(-1, num_kv_heads, head_dim)[:length].float()
        values = v_cache[blocks].transpose(1, 2).reshape(-1, num_kv_heads, head_dim)[:length].float()
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), keys) * scale
        out[b] = torch.einsum("hl,lhd->hd", torch.softmax(scores, dim=-1), values).to(q.dtype)
    return out
