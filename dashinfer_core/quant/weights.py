"""Weight-only quantization (DashInfer's InstantQuant): int8 or int4, asymmetric, per output channel or
per group of input channels, computed at load time with no calibration.

Layout of a quantized [N, K] weight:
  qweight  uint8 [N, K] (8 bits) or [N, ceil(K / 2)] (4 bits: column k in the low nibble of byte k // 2
           when k is even, in the high nibble when odd)
  scales   float32 [N, G] and zeros float32 [N, G] (integer zero points), G = ceil(K / group_size)
           groups along K (the last one may be partial); per channel: G = 1
  w[n, k] = (q[n, k] - zeros[n, k // group]) * scales[n, k // group]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class QuantizedWeight:
    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int  # = K for per-channel
    shape: tuple[int, int]  # (N, K)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros))


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """[N, K] values 0..15 -> [N, ceil(K/2)] bytes (even column low nibble, odd column high)."""
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1)[:, :k]


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> QuantizedWeight:
    """Asymmetric min/max quantization of a [N, K] weight, per channel (group_size None) or per group."""
    n, k = weight.shape
    group = k if group_size is None else group_size
    groups = -(-k // group)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, groups * group - k)).view(n, groups, group)
    valid = torch.arange(groups * group, device=w.device).view(groups, group) < k
    lo = torch.where(valid, padded, float("inf")).amin(-1).clamp(max=0.0)
    hi = torch.where(valid, padded, float("-inf")).amax(-1).clamp(min=0.0)
    qmax = (1 << bits) - 1
    scales = ((hi - lo) / qmax).clamp(min=1e-8)
    zeros = torch.round(-lo / scales).clamp(0, qmax)
    q = torch.clamp(torch.round(padded / scales[..., None]) + zeros[..., None], 0, qmax).view(n, -1)[:, :k]
    q = q.to(torch.uint8)
    qweight = pack_int4(q) if bits == 4 else q
    return QuantizedWeight(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), bits, group, (n, k))


def unpacked(qw: QuantizedWeight) -> torch.Tensor:
    return unpack_int4(qw.qweight, qw.shape[1]) if qw.bits == 4 else qw.qweight


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The [N, K] weight the quantized one stands for."""
    q = unpacked(qw).float()
    group_of = torch.arange(qw.shape[1], device=q.device) // qw.group_size
    w = (q - qw.zeros[:, group_of]) * qw.scales[:, group_of]
    return w.to(dtype)


def concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack quantized weights along N (q|k|v, gate|up): all parameters are per output row."""
    first = parts[0]
    assert all(p.bits == first.bits and p.group_size == first.group_size and p.shape[1] == first.shape[1]
               for p in parts)
    return QuantizedWeight(torch.cat([p.qweight for p in parts]), torch.cat([p.scales for p in parts]),
                           torch.cat([p.zeros for p in parts]), first.bits, first.group_size,
                           (sum(p.shape[0] for p in parts), first.shape[1]))
