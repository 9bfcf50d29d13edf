"""Rotary embedding applied in place to q and k (rotate-half layout, as HF Llama/Qwen).

q [T, Hq, D] and k [T, Hkv, D] may be strided views of the fused qkv projection (head_dim
contiguous); cos_cache / sin_cache [max_positions, D/2]; positions [T] int64.
(x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin), products and sums rounded to the model dtype like
HF's bf16 arithmetic. Grid (T, Hq + Hkv): one program per token and head.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, pos_ptr, stride_qt, stride_qh, stride_kt, stride_kh,
                   stride_cos, NUM_Q_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, BLOCK)
    mask = i < HALF
    cos = tl.load(cos_ptr + pos * stride_cos + i, mask=mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + i, mask=mask, other=0.0).to(tl.float32)
    if h < NUM_Q_HEADS:
        base = q_ptr + t * stride_qt + h * stride_qh
    else:
        base = k_ptr + t * stride_kt + (h - NUM_Q_HEADS) * stride_kh
    x1 = tl.load(base + i, mask=mask, other=0.0)
    x2 = tl.load(base + HALF + i, mask=mask, other=0.0)
    dt = x1.dtype
    a1 = (x1.to(tl.float32) * cos).to(dt).to(tl.float32)
    b1 = (x2.to(tl.float32) * sin).to(dt).to(tl.float32)
    a2 = (x2.to(tl.float32) * cos).to(dt).to(tl.float32)
    b2 = (x1.to(tl.float32) * sin).to(dt).to(tl.float32)
    tl.store(base + i, (a1 - b1).to(dt), mask=mask)
    tl.store(base + HALF + i, (a2 + b2).to(dt), mask=mask)


def rotary_inplace(q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor, sin_cache: torch.Tensor,
                   positions: torch.Tensor) -> None:
    num_tokens, num_q_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    assert q.stride(2) == 1 and k.stride(2) == 1 and cos_cache.stride(1) == 1
    _rotary_kernel[(num_tokens, num_q_heads + k.shape[1])](
        q, k, cos_cache, sin_cache, positions, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos_cache.stride(0), NUM_Q_HEADS=num_q_heads, HALF=head_dim // 2,
        BLOCK=triton.next_power_of_2(head_dim // 2))


def rotary_ref(x, cos_cache, sin_cache, positions):
    cos = cos_cache[positions].unsqueeze(1)
    sin = sin_cache[positions].unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
