"""KV-cache quantization: each token's K (and V) vector of one head is stored as int8 or uint4 with its
own scale and zero point (asymmetric min/max over head_dim), so the cache takes a quarter (int8) or
an eighth (uint4, two values per byte) of fp32, plus 8 bytes per token and head for scale and zero.
"""
from __future__ import annotations

import torch

KV_BITS = {"auto": None, "int8": 8, "uint4": 4}


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (uint8 [..., D] or [..., D/2] packed, scale [...], zero [...]) in float32."""
    qmax = (1 << bits) - 1
    xf = x.float()
    lo = xf.amin(dim=-1)
    hi = xf.amax(dim=-1)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(xf / scale[..., None]) + zero[..., None], 0, qmax).to(torch.uint8)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale, zero


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    if bits == 4:
        q = torch.stack((q & 0x0F, q >> 4), dim=-1).flatten(-2)
    values = (q.float() - zero[..., None]) * scale[..., None]
    if out is None:
        return values.to(dtype)
    out.copy_(values)
    return out
