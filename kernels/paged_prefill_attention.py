"""Prefill / chunked-prefill attention over the paged KV cache, causal and varlen.

Every sequence's new tokens attend to its cached prefix plus the new tokens themselves, all read
from the paged cache (the step's K/V are stored before attention), so prefix-cache hits and later
prefill chunks need nothing special.

Layouts: q [T, Hq, D] (tokens of all sequences back to back; head_dim contiguous);
query_start_loc [B + 1] int32; seq_lens [B] int32 (context length after this step, i.e. cached prefix
+ new tokens); block_tables [B, max_blocks] int32; caches [num_blocks, Hkv, block_size, D].
Output [T, Hq, D]. Grid (cdiv(max_query_len, BLOCK_M), B, Hq): a program takes BLOCK_M query rows of
one sequence and one head and walks the cache blocks up to its last row's position with an online
softmax. Query row i of a sequence sits at position seq_len - query_len + i.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .kv_tiles import online_softmax_block


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr, k_zero_ptr, v_zero_ptr,
                    block_tables_ptr, seq_lens_ptr, query_start_ptr, out_ptr,
                    scale, stride_qt, stride_qh, stride_ot, stride_oh, stride_bt,
                    NUM_KV_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, IEEE: tl.constexpr,
                    KV_BITS: tl.constexpr, KV_GROUPS: tl.constexpr):
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(query_start_ptr + b)
    q_len = tl.load(query_start_ptr + b + 1) - q_start
    if m_block * BLOCK_M >= q_len:
        return
    ctx_len = tl.load(seq_lens_ptr + b)
    prefix = ctx_len - q_len
    kv_head = head // GROUP

    rows = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, BLOCK_D)
    n = tl.arange(0, BLOCK_SIZE)
    d_ok = d < HEAD_DIM
    row_ok = rows < q_len
    q = tl.load(q_ptr + (q_start + rows)[:, None] * stride_qt + head * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if IEEE:
        q = q.to(tl.float32)
    q_pos = prefix + rows

    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    last_pos = tl.minimum(ctx_len, prefix + (m_block + 1) * BLOCK_M)
    for j in range(0, tl.cdiv(last_pos, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + b * stride_bt + j).to(tl.int64)
        k_pos = j * BLOCK_SIZE + n
        visible = (k_pos[None, :] <= q_pos[:, None]) & (k_pos < ctx_len)[None, :]
        m, l, acc = online_softmax_block(q, m, l, acc, q_ptr, k_cache_ptr, v_cache_ptr, k_scale_ptr, v_scale_ptr,
                                         k_zero_ptr, v_zero_ptr, block, kv_head, visible, scale, NUM_KV_HEADS,
                                         BLOCK_SIZE, HEAD_DIM, BLOCK_D, KV_BITS, KV_GROUPS, IEEE)
    out = acc / tl.where(l > 0, l, 1.0)[:, None]
    tl.store(out_ptr + (q_start + rows)[:, None] * stride_ot + head * stride_oh + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def paged_prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, query_start_loc: torch.Tensor,
                            max_query_len: int, scale: float, out: torch.Tensor | None = None,
                            block_m: int = 64, kv_quant: tuple | None = None) -> torch.Tensor:
    """kv_quant: None, or (bits, k_scales, v_scales, k_zeros, v_zeros) for int8 / uint4 caches."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    bits, k_s, v_s, k_z, v_z = kv_quant if kv_quant else (0, k_cache, v_cache, k_cache, v_cache)
    if out is None:
        out = torch.empty_like(q)
    batch = seq_lens.shape[0]
    if num_tokens == 0 or batch == 0:
        return out
    assert q.stride(2) == 1 and out.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
    grid = (triton.cdiv(max_query_len, block_m), batch, num_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, k_s, v_s, k_z, v_z, block_tables, seq_lens, query_start_loc, out, scale,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), block_tables.stride(0),
        NUM_KV_HEADS=num_kv_heads, GROUP=num_heads // num_kv_heads, BLOCK_SIZE=block_size, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=block_m, IEEE=q.dtype == torch.float32, KV_BITS=bits,
        KV_GROUPS=k_s.shape[-1] if bits else 1)
    return out


def paged_prefill_attention_ref(q, k_cache, v_cache, block_tables, seq_lens, query_start_loc, scale):
    """Per sequence: gather its context from the blocks, causal softmax attention in float32."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads, block_size = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(seq_lens.shape[0]):
        start, end, ctx = int(query_start_loc[b]), int(query_start_loc[b + 1]), int(seq_lens[b])
        blocks = block_tables[b, : -(-ctx // block_size)].long()
        keys = k_cache[blocks].transpose(1, 2).reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        values = v_cache[blocks].transpose(1, 2).reshape(-1, num_kv_heads, head_dim)[:ctx].float()
        keys = keys.repeat_interleave(num_heads // num_kv_heads, dim=1)
        values = values.repeat_interleave(num_heads // num_kv_heads, dim=1)
        scores = torch.einsum("qhd,khd->hqk", q[start:end].float(), keys) * scale
        q_pos = torch.arange(ctx - (end - start), ctx, device=q.device)
        visible = torch.arange(ctx, device=q.device)[None, :] <= q_pos[:, None]
        scores = scores.masked_fill(~visible, float("-inf"))
        out[start:end] = torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), values).to(q.dtype)
    return out
