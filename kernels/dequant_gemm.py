"""Dequantize-GEMM: y = x @ W^T for a weight-only quantized W (int8, or int4 two per byte), with
per-channel or grouped asymmetric scales and zero points (dashinfer_core.quant.weights layout).

x [M, K] (fp32/bf16/fp16, row-major); qweight uint8 [N, K] (8 bits) or [N, ceil(K/2)] (4 bits: even
column in the low nibble); scales, zeros float32 [N, G] with G = ceil(K / group_size); y [M, N] in
x's dtype. Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)): a program accumulates one output tile over K in
steps of BLOCK_K, dequantizing each weight tile in registers right before its dot. For 4 bits the even
and odd input columns are multiplied separately (x[:, 0::2] with the low nibbles, x[:, 1::2] with the
high ones), so no unpacking shuffle is needed. BLOCK_K divides group_size, so a K-step sees one group.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _dequant_gemm_kernel(x_ptr, q_ptr, s_ptr, z_ptr, y_ptr, M, N, K, stride_xm, stride_qn, stride_sn, stride_ym,
                         GROUP: tl.constexpr, BITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = rm < M
    n_ok = rn < N
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    HALF: tl.constexpr = BLOCK_K // 2
    for k0 in range(0, K, BLOCK_K):
        g = k0 // GROUP
        s = tl.load(s_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + rn * stride_sn + g, mask=n_ok, other=0.0)
        if BITS == 8:
            rk = k0 + tl.arange(0, BLOCK_K)
            k_ok = rk < K
            x = tl.load(x_ptr + rm[:, None] * stride_xm + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            q = tl.load(q_ptr + rn[:, None] * stride_qn + rk[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0)
            w = (q.to(tl.float32) - z[:, None]) * s[:, None]
            w = tl.where(k_ok[None, :], w, 0.0)
            if IEEE:
                acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
            else:
                acc += tl.dot(x, tl.trans(w.to(x.dtype)))
        else:
            rb = k0 // 2 + tl.arange(0, HALF)  # byte columns
            k_even = 2 * rb
            even_ok = k_even < K
            odd_ok = (k_even + 1) < K
            packed = tl.load(q_ptr + rn[:, None] * stride_qn + rb[None, :], mask=n_ok[:, None] & even_ok[None, :],
                             other=0)
            lo = (packed & 0x0F).to(tl.float32)
            hi = (packed >> 4).to(tl.float32)
            w_even = tl.where(even_ok[None, :], (lo - z[:, None]) * s[:, None], 0.0)
            w_odd = tl.where(odd_ok[None, :], (hi - z[:, None]) * s[:, None], 0.0)
            x_even = tl.load(x_ptr + rm[:, None] * stride_xm + k_even[None, :], mask=m_ok[:, None] & even_ok[None, :],
                             other=0.0)
            x_odd = tl.load(x_ptr + rm[:, None] * stride_xm + k_even[None, :] + 1,
                            mask=m_ok[:, None] & odd_ok[None, :], other=0.0)
            if HALF < 16:  # tl.dot needs K >= 16: a broadcast multiply-and-sum over the 8 columns
                acc += tl.sum(x_even.to(tl.float32)[:, None, :] * w_even[None, :, :], axis=2)
                acc += tl.sum(x_odd.to(tl.float32)[:, None, :] * w_odd[None, :, :], axis=2)
            elif IEEE:
                acc += tl.dot(x_even.to(tl.float32), tl.trans(w_even), input_precision="ieee")
                acc += tl.dot(x_odd.to(tl.float32), tl.trans(w_odd), input_precision="ieee")
            else:
                acc += tl.dot(x_even, tl.trans(w_even.to(x_even.dtype)))
                acc += tl.dot(x_odd, tl.trans(w_odd.to(x_odd.dtype)))
    tl.store(y_ptr + rm[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def dequant_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                 group_size: int, n: int, k: int, block_m: int = 32, block_n: int = 64,
                 block_k: int | None = None) -> torch.Tensor:
    m = x.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    if block_k is None:  # a K-step must not straddle two groups
        block_k = 64
        while group_size < k and group_size % block_k:
            block_k //= 2
    assert (group_size >= k or group_size % block_k == 0) and block_k >= 16 and x.stride(1) == 1
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _dequant_gemm_kernel[grid](x, qweight, scales, zeros, y, m, n, k, x.stride(0), qweight.stride(0),
                               scales.stride(0), y.stride(0), GROUP=group_size, BITS=bits, BLOCK_M=block_m,
                               BLOCK_N=block_n, BLOCK_K=block_k, IEEE=x.dtype == torch.float32)
    return y


def dequant_gemm_ref(x, qweight, scales, zeros, bits, group_size, n, k) -> torch.Tensor:
    """Dequantize the whole weight, then one matmul in float32."""
    if bits == 4:
        q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).reshape(n, -1)[:, :k]
    else:
        q = qweight
    group_of = torch.arange(k, device=x.device) // group_size
    w = (q.float() - zeros[:, group_of]) * scales[:, group_of]
    return (x.float() @ w.t()).to(x.dtype)
