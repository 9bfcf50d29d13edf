"""Fused residual add + RMSNorm.

x, residual, out: [T, H] (row stride free, columns contiguous); weight [H].
With a residual: residual <- x + residual (in place) and out = norm(residual); without: out = norm(x).
The arithmetic follows HF's RMSNorm: the sum is rounded to the model dtype, the normalisation runs
in float32, the result is rounded to the model dtype before the weight multiply.
Grid (T,): one program per row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rmsnorm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, eps, stride_x, stride_r, stride_o,
                    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < HIDDEN
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_ptr + row * stride_r + cols, x, mask=mask)
    h = x.to(tl.float32)
    variance = tl.sum(h * h, axis=0) / HIDDEN
    normed = (h * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
            out: torch.Tensor | None = None) -> torch.Tensor:
    rows, hidden = x.shape
    if out is None:
        out = torch.empty_like(x)
    if rows == 0:
        return out
    assert x.stride(1) == 1 and out.stride(1) == 1 and (residual is None or residual.stride(1) == 1)
    _rmsnorm_kernel[(rows,)](
        x, residual if residual is not None else x, weight, out, eps, x.stride(0),
        residual.stride(0) if residual is not None else 0, out.stride(0),
        HIDDEN=hidden, BLOCK=triton.next_power_of_2(hidden), HAS_RESIDUAL=residual is not None)
    return out


def rmsnorm_ref(x, weight, eps, residual=None):
    """Returns (out, new_residual) like the kernel's in-place residual update."""
    if residual is not None:
        x = x + residual
        residual = x
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype), residual
