"""Weight-only quantization (DashInfer's InstantQuant): int8 or int4, asymmetric, per output channel or
per group of input channels, computed at load time with no calibration.

Layout of a quantized [N, K] weight:
  qweight  uint8 [N, K] (8 bits) or [N, ceil(K / 2)] (4 bits: column k in the low nibble of byte k // 2
           when k is even, in the high nibble when odd)
  scales   float32 [N, G] and zeros float32 [N, G], G = ceil(K / group_size) groups along K (the last one
           may be partial); per channel: G = 1. Zero points: floats or integers (see below)
  w[n, k] = (q[n, k] - zeros[n, k // group]) * scales[n, k // group]

Groups of up to 32: each group's (scale, minimum) comes from its own range with a float zero point; for
4 bits a short search then tries narrower and coarser steps and refits scale and minimum by least
squares to the integers they give (as llama.cpp's k-quants do), keeping the fit with the smallest squared
error. A group that was itself a 4-bit (scale, minimum) group, as the embedded model's Q4_1 weights are,
is reproduced exactly. Larger groups and per channel: min/max over a range that holds 0, with integer
zero points (the fit measured worse there: see quantize).
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


# The 4-bit search's candidate steps, as fractions of the group's range: 1/15 (min/max); narrower
# ranges centred on the group's, clipping its outliers (1/15 of 0.95 ... 0.7 of the range); and coarser
# steps anchored at its minimum, for groups whose values sit on fewer levels (a Q4_1 group whose
# integers span 2..13 has a step of 1/11 of its range).
SEARCH_STEPS = tuple((f / 15, True) for f in (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)) + \
    tuple((1 / levels, False) for levels in range(14, 7, -1))


MAX_FIT_GROUP = 32


def quantize(weight: torch.Tensor, bits: int, group_size: int | None = None,
             integer_zeros: bool | None = None) -> QuantizedWeight:
    """Asymmetric quantization of a [N, K] weight, per channel (group_size None) or per group.
    integer_zeros: min/max over a range widened to hold 0, with integer zero points (0.0 exactly
    representable; what GPTQ's format stores) instead of the fit with float zero points. Default: the
    fit for groups of up to 32, integer zero points for larger groups and per channel, where they gave
    the lower perplexity on the embedded model (README, Quantization)."""
    n, k = weight.shape
    group = k if group_size is None else group_size
    if integer_zeros is None:
        integer_zeros = group > MAX_FIT_GROUP
    groups = -(-k // group)
    w = weight.float()
    padded = torch.nn.functional.pad(w, (0, groups * group - k)).view(n, groups, group)
    valid = torch.arange(groups * group, device=w.device).view(groups, group) < k
    lo = torch.where(valid, padded, float("inf")).amin(-1)
    hi = torch.where(valid, padded, float("-inf")).amax(-1)
    qmax = (1 << bits) - 1
    if integer_zeros:
        lo, hi = lo.clamp(max=0.0), hi.clamp(min=0.0)
        scales = ((hi - lo) / qmax).clamp(min=1e-8)
        zeros = torch.round(-lo / scales).clamp(0, qmax)
        q = torch.clamp(torch.round(padded / scales[..., None]) + zeros[..., None], 0, qmax)
    else:
        steps = SEARCH_STEPS if bits == 4 else ((1 / qmax, True),)
        # ~256K weights at a time: the search's temporaries then stay in cache (2.5x faster here).
        rows = max(1, (1 << 18) // (groups * group))
        fits = [_fit_groups(padded[i:i + rows], valid, lo[i:i + rows], hi[i:i + rows], qmax, steps)
                for i in range(0, n, rows)]
        scales, mins = torch.cat([f[0] for f in fits]), torch.cat([f[1] for f in fits])
        zeros = -mins / scales
        q = torch.clamp(torch.round((padded - mins[..., None]) / scales[..., None]), 0, qmax)
    q = q.view(n, -1)[:, :k].to(torch.uint8)
    qweight = pack_int4(q) if bits == 4 else q
    return QuantizedWeight(qweight.contiguous(), scales.contiguous(), zeros.contiguous(), bits, group, (n, k))


def _fit_groups(w: torch.Tensor, valid: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, qmax: int,
                steps) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, minimum) per group [N, G] with w ~ q * scale + minimum, q in 0..qmax: for each candidate
    step (a fraction of the range; centred, or anchored at the minimum), the integers it gives, then scale
    and minimum refit to them by least squares; per group the candidate with the smallest squared error
    (the plain min/max fit is the first)."""
    # Where every group is full (K a multiple of the group) there is no padding to mask: the products by an
    # all-ones mask are skipped (the same sums; the load of a 135M model with iq-int4 spends its time here).
    mask = None if bool(valid.all()) else valid.to(w.dtype).expand_as(w)
    count = torch.full_like(lo, w.shape[-1]) if mask is None else mask.sum(-1)
    sw = (w if mask is None else w * mask).sum(-1)  # (the same for every candidate)
    width = (hi - lo).clamp(min=1e-8)
    best_err = best_s = best_m = None

    def error(s, m):
        q = torch.clamp_(torch.round_((w - m[..., None]) / s[..., None]), 0, qmax)
        diff = q * s[..., None] + m[..., None] - w
        diff.mul_(diff)
        return (diff if mask is None else diff.mul_(mask)).sum(-1), q

    for fraction, centred in steps:
        s0 = width * fraction
        m0 = lo + (width - s0 * qmax) / 2 if centred else lo
        err0, q = error(s0, m0)
        candidates = [(s0, m0, err0)]
        if len(steps) > 1:  # the least-squares refit of this candidate's integers
            qm = q if mask is None else q * mask
            sq, sqq, sqw = qm.sum(-1), (q * qm).sum(-1), (w * qm).sum(-1)
            det = count * sqq - sq * sq
            ok = det > 1e-6 * count * count  # the integers vary: a slope can be fitted
            s = torch.where(ok, (count * sqw - sq * sw) / torch.where(ok, det, 1.0), s0)
            ok = ok & (s > 1e-8)
            s = torch.where(ok, s, s0)
            m = torch.where(ok, (sw - s * sq) / count, m0)
            candidates.append((s, m, error(s, m)[0]))
        for s, m, err in candidates:
            if best_err is None:
                best_err, best_s, best_m = err, s, m
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
    return best_s.clamp(min=1e-8), best_m


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
