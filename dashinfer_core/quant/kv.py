"""KV-cache quantization: each token's K (and V) vector of one head is stored as int8 or uint4 with
scales and zero points (asymmetric min/max) per group of head_dim values: the whole vector for int8,
groups of 32 for uint4 (one 4-bit range over 64 values lost too much: SmolLM2's answers fell apart).
The cache then takes about a quarter (int8) or an eighth (uint4, two values per byte) of fp32, plus
8 bytes of fp32 scale and zero per group.
"""
from __future__ import annotations

import torch

KV_BITS = {"auto": None, "int8": 8, "uint4": 4}
UINT4_GROUP = 32


def kv_groups(bits: int, head_dim: int) -> int:
    """Scale / zero-point pairs per token and head."""
    return max(1, head_dim // UINT4_GROUP) if bits == 4 and head_dim % UINT4_GROUP == 0 else 1


def quantize_kv(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., D] -> (uint8 [..., D] or [..., D/2] packed, scale [..., G], zero [..., G]) in float32."""
    qmax = (1 << bits) - 1
    groups = kv_groups(bits, x.shape[-1])
    xf = x.float().unflatten(-1, (groups, -1))
    lo = xf.amin(dim=-1)
    hi = xf.amax(dim=-1)
    scale = ((hi - lo) / qmax).clamp(min=1e-8)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(xf / scale[..., None]) + zero[..., None], 0, qmax).to(torch.uint8).flatten(-2)
    if bits == 4:
        q = q[..., 0::2] | (q[..., 1::2] << 4)
    return q, scale, zero


def dequantize_kv(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int,
                  dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    if bits == 4:
        q = torch.stack((q & 0x0F, q >> 4), dim=-1).flatten(-2)
    groups = scale.shape[-1]
    values = ((q.float().unflatten(-1, (groups, -1)) - zero[..., None]) * scale[..., None]).flatten(-2)
    if out is None:
        return values.to(dtype)
    out.copy_(values)
    return out
