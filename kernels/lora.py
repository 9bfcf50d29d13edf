"""Multi-LoRA shrink and expand for a batch where every token has its own adapter slot (or none, -1):
    shrink: s[t] = x[t] @ A[slot_t]^T        x [T, K], A [slots, R, K]  -> s [T, R] float32
    expand: y[t] += s[t] @ B[slot_t]^T       B [slots, N, R], y [T, N] updated in place
(s, B and y may be column slices: a merged layer's shard is expanded from its own R columns of s)
Tokens need no sorting: each program reads its token's slot and the rows of that slot's matrices
(Punica's BGMV shape). Grid (T, cdiv(R or N, BLOCK))."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, slots_ptr, s_ptr, stride_x, stride_a0, stride_a1, K, R,
                   BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R], dtype=tl.float32)
    if slot >= 0:
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            xv = tl.load(x_ptr + t * stride_x + cols, mask=cols < K, other=0.0).to(tl.float32)
            av = tl.load(a_ptr + slot * stride_a0 + rows[:, None] * stride_a1 + cols[None, :],
                         mask=(rows[:, None] < R) & (cols[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.sum(av * xv[None, :], axis=1)
    tl.store(s_ptr + t * R + rows, acc, mask=rows < R)


@triton.jit
def _expand_kernel(s_ptr, b_ptr, slots_ptr, y_ptr, stride_s, stride_b0, stride_b1, stride_y, R, N,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t)
    if slot >= 0:
        outs = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        for r0 in range(0, R, BLOCK_R):
            rs = r0 + tl.arange(0, BLOCK_R)
            sv = tl.load(s_ptr + t * stride_s + rs, mask=rs < R, other=0.0)
            bv = tl.load(b_ptr + slot * stride_b0 + outs[:, None] * stride_b1 + rs[None, :],
                         mask=(outs[:, None] < N) & (rs[None, :] < R), other=0.0).to(tl.float32)
            acc += tl.sum(bv * sv[None, :], axis=1)
        y = tl.load(y_ptr + t * stride_y + outs, mask=outs < N, other=0.0)
        tl.store(y_ptr + t * stride_y + outs, (y.to(tl.float32) + acc).to(y.dtype), mask=outs < N)


def lora_shrink(x: torch.Tensor, a: torch.Tensor, token_slots: torch.Tensor, block_r: int = 16,
                block_k: int = 128) -> torch.Tensor:
    tokens, k = x.shape
    rank = a.shape[1]
    s = torch.empty(tokens, rank, dtype=torch.float32, device=x.device)
    if tokens == 0:
        return s
    assert x.stride(1) == 1 and a.stride(2) == 1 and a.shape[2] == k
    block_r = min(block_r, triton.next_power_of_2(rank))
    block_k = min(block_k, triton.next_power_of_2(k))
    _shrink_kernel[(tokens, triton.cdiv(rank, block_r))](x, a, token_slots, s, x.stride(0), a.stride(0), a.stride(1),
                                                          k, rank, BLOCK_R=block_r, BLOCK_K=block_k)
    return s


def lora_expand(s: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor, y: torch.Tensor, block_n: int = 64,
                block_r: int = 32) -> torch.Tensor:
    tokens, rank = s.shape
    n = b.shape[1]
    if tokens == 0:
        return y
    assert s.stride(1) == 1 and y.stride(1) == 1 and b.stride(2) == 1 and b.shape[2] == rank and y.shape == (tokens, n)
    block_n = min(block_n, triton.next_power_of_2(n))
    block_r = min(block_r, triton.next_power_of_2(rank))
    _expand_kernel[(tokens, triton.cdiv(n, block_n))](s, b, token_slots, y, s.stride(0), b.stride(0), b.stride(1),
                                                       y.stride(0), rank, n, BLOCK_N=block_n, BLOCK_R=block_r)
    return y


def lora_shrink_ref(x, a, token_slots):
    s = torch.zeros(x.shape[0], a.shape[1], dtype=torch.float32, device=x.device)
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            s[t] = a[slot].float() @ x[t].float()
    return s


def lora_expand_ref(s, b, token_slots, y):
    out = y.clone()
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            out[t] = (y[t].float() + b[slot].float() @ s[t]).to(y.dtype)
    return out
