"""GPTQ checkpoints (AutoGPTQ / HF "gptq" format, 4 bits, no act-order).

Per linear layer the checkpoint holds, for an [N, K] weight in groups of g input channels:
  qweight int32 [K / 8, N]      eight 4-bit values along K per word (value k in bits 4 * (k % 8))
  qzeros  int32 [K / g, N / 8]  eight 4-bit zero points along N per word, stored minus one
  scales  fp16  [K / g, N]
  g_idx   int32 [K]             the group of each input channel (k // g without act-order)
  w[n, k] = scales[k // g, n] * (q[k, n] - (stored_zero[k // g, n] + 1))
They are converted as they are (no requantization) into this package's QuantizedWeight layout.
"""
from __future__ import annotations

import torch

from ..errors import UnsupportedModelError
from .weights import QuantizedWeight, pack_int4

GPTQ_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def check_gptq_config(qcfg: dict) -> int:
    """Validate a quantization_config; returns the group size (-1 = per channel)."""
    if qcfg.get("bits") != 4:
        raise UnsupportedModelError(f"GPTQ with bits={qcfg.get('bits')} is not supported; only 4-bit checkpoints load")
    if qcfg.get("desc_act"):
        raise UnsupportedModelError("GPTQ with desc_act=true (act-order) is not supported; re-quantize without it")
    fmt = qcfg.get("checkpoint_format", "gptq")
    if fmt != "gptq":
        raise UnsupportedModelError(f"GPTQ checkpoint_format {fmt!r} is not supported; only 'gptq'")
    return int(qcfg.get("group_size", 128))


def _unpack_along_rows(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] with eight nibbles per word along R -> [8R, C] values 0..15."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((packed[:, None, :] >> shifts[None, :, None]) & 0xF).reshape(-1, packed.shape[1])


def _unpack_along_cols(packed: torch.Tensor) -> torch.Tensor:
    """int32 [R, C] with eight nibbles per word along C -> [R, 8C]."""
    shifts = torch.arange(0, 32, 4, device=packed.device, dtype=torch.int32)
    return ((packed[:, :, None] >> shifts[None, None, :]) & 0xF).reshape(packed.shape[0], -1)


def gptq_to_quantized(parts: dict[str, torch.Tensor], group_size: int) -> QuantizedWeight:
    q_kn = _unpack_along_rows(parts["qweight"].to(torch.int32))  # [K, N]
    k, n = q_kn.shape
    group = k if group_size in (-1, None) else group_size
    expected = torch.arange(k, device=q_kn.device) // group
    if "g_idx" in parts and not torch.equal(parts["g_idx"].to(torch.int64).cpu(), expected.cpu()):
        raise UnsupportedModelError("GPTQ g_idx is not k // group_size (act-order?): not supported")
    zeros = _unpack_along_cols(parts["qzeros"].to(torch.int32))[:, :n] + 1  # [G, N]
    return QuantizedWeight(pack_int4(q_kn.t().contiguous().to(torch.uint8)), parts["scales"].float().t().contiguous(),
                           zeros.float().t().contiguous(), 4, group, (n, k))


def quantized_to_gptq(qw: QuantizedWeight) -> dict[str, torch.Tensor]:
    """The inverse, for writing test checkpoints: a 4-bit QuantizedWeight as GPTQ tensors."""
    from .weights import unpacked
    n, k = qw.shape
    if k % 8 or n % 8 or qw.bits != 4:
        raise ValueError("GPTQ packing needs 4 bits and N, K multiples of 8")
    zeros = qw.zeros.round().to(torch.int32)
    if (zeros < 1).any() or (zeros > 16).any():
        raise ValueError("GPTQ stores zero points minus one in 4 bits: zero points must be in [1, 16]")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    q_kn = unpacked(qw).to(torch.int32).t().contiguous()  # [K, N]
    qweight = (q_kn.view(k // 8, 8, n) << shifts[None, :, None]).sum(1, dtype=torch.int32)
    z_gn = ((zeros - 1) & 0xF).t().contiguous()  # [G, N]
    qzeros = (z_gn.view(z_gn.shape[0], n // 8, 8) << shifts[None, None, :]).sum(2, dtype=torch.int32)
    return {"qweight": qweight, "qzeros": qzeros, "scales": qw.scales.t().contiguous().half(),
            "g_idx": (torch.arange(k) // qw.group_size).to(torch.int32)}


def install_gptq(model, stash: dict[tuple[str, int], dict[str, torch.Tensor]], group_size: int) -> None:
    """Replace each Linear whose shards came as GPTQ tensors by a QuantizedLinear of them."""
    from .linear import install_quantized
    converted = {}
    for (path, shard), parts in stash.items():
        missing = [p for p in ("qweight", "qzeros", "scales") if p not in parts]
        if missing:
            raise UnsupportedModelError(f"GPTQ layer {path} shard {shard} lacks {missing}")
        converted[(path, shard)] = gptq_to_quantized(parts, group_size)
    install_quantized(model, converted, "GPTQ")
