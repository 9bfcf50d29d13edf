"""QuantizedLinear: a Linear whose weight is stored quantized (weight-only int8/int4, or int8 with
int8 activations, "A8W8"), and the switch that converts a loaded model's linear layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import (INT4_GROUPS, compile_works, disabled_paths, int4_gemv_works, int8_gemm_works,
                            int8_gemv_works)
from ..compiling import compile_or_eager
from ..errors import InvalidParameterError
from ..layers import use_triton_ops
from ..layers.linear import Linear
from .weights import QuantizedWeight, dequantize, quantize, unpacked

# name -> (bits, activation quantization)
QUANT_MODES = {"iq-int8": (8, False), "iq-int4": (4, False), "a8w8": (8, True)}


class QuantizedLinear(nn.Module):
    def __init__(self, qw: QuantizedWeight, bias: torch.Tensor | None, shard_sizes: tuple[int, ...],
                 compute_dtype: torch.dtype, activations_int8: bool = False):
        super().__init__()
        self.out_features, self.in_features = qw.shape
        self.shard_sizes = shard_sizes
        self.bits, self.group_size = qw.bits, qw.group_size
        self.compute_dtype = compute_dtype
        self.activations_int8 = activations_int8
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", qw.scales)
        self.register_buffer("zeros", qw.zeros)
        if qw.qweight.dtype == torch.int8:  # signed per-channel layout (see to_signed_int8)
            self.register_buffer("scales_bf16", qw.scales[:, 0].to(torch.bfloat16))
            self.register_buffer("zero_term", self.scales_bf16.float() * qw.zeros[:, 0])  # s * z, fp32
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        # int4 in groups on the CPU with bf16: torch's int4 kernel at decode sizes, from its own packing
        # of the same integers; w = (q - z) * s = (q - 8) * s + (8 - z) * s.
        packed = None
        if qw.bits == 4 and compute_dtype == torch.bfloat16 and qw.group_size in INT4_GROUPS and \
                qw.shape[1] % qw.group_size == 0 and qw.qweight.device.type == "cpu" and int4_gemv_works():
            try:
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unpacked(qw).to(torch.int32), 1)
            except RuntimeError:  # a shape the kernel does not take: the dequantizing matmul serves it
                packed = None
        self.register_buffer("int4_packed", packed)
        self.register_buffer("int4_scales_zeros", None if packed is None else torch.stack(
            [qw.scales.t(), ((8 - qw.zeros) * qw.scales).t()], dim=-1).contiguous().to(torch.bfloat16))
        if activations_int8:  # symmetric int8 weight for torch._int_mm, [K, N] as it wants
            w = dequantize(qw)
            self.register_buffer("w_scale", (w.abs().amax(dim=1) / 127).clamp(min=1e-8))
            self.register_buffer("w_int8_t", torch.round(w / self.w_scale[:, None]).clamp(-127, 127)
                                 .to(torch.int8).t().contiguous())

    def quantized(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                               (self.out_features, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4_packed is not None and x.dtype == torch.bfloat16 and \
                x.numel() <= INT4PACK_MAX_ROWS * self.in_features:
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.int4_packed, self.group_size,
                                                           self.int4_scales_zeros).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if self.activations_int8:
            y = a8w8_linear(x, self.w_int8_t, self.w_scale)
        elif self.qweight.dtype == torch.int8 and x.dtype == torch.bfloat16 and \
                x.numel() <= INT8PACK_MAX_ROWS * self.in_features:
            y = int8pack_linear(x, self.qweight, self.scales_bf16, self.zero_term)
        elif use_triton_ops(x):
            from dashinfer_kernels.dequant_gemm import dequant_gemm
            flat = x.reshape(-1, self.in_features)
            y = dequant_gemm(flat.contiguous(), self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                             self.out_features, self.in_features).view(*x.shape[:-1], self.out_features)
        else:
            y = cpu_dequant_linear(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size,
                                   self.in_features)
        return y if self.bias is None else y + self.bias


def _dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group: int, k: int) -> torch.Tensor:
    """x @ dequant(W)^T written without gathers, so torch.compile can fuse the dequantization into
    the matmul's loads instead of writing a full-precision weight first."""
    q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).flatten(1) if bits == 4 else qweight
    n, groups = q.shape[0], scales.shape[1]
    width = groups * group
    q = q[:, :width] if q.shape[1] >= width else F.pad(q, (0, width - q.shape[1]))
    w = ((q.view(n, groups, group).float() - zeros[..., None]) * scales[..., None]).view(n, width)[:, :k]
    return torch.matmul(x, w.to(x.dtype).t())


def compiled_dequant_wanted() -> bool:
    return compile_works()[0] and "compiled_dequant" not in disabled_paths()


# The compiled form runs 4-25x faster than dequantize-then-GEMM on the CPU (measured on the dev
# machine); eager is the fallback where torch.compile is unavailable or fails.
compiled_dequant_linear = compile_or_eager(_dequant_linear, name="compiled dequant linear",
                                           enabled=compiled_dequant_wanted, dynamic=True)


def cpu_dequant_linear(x, qweight, scales, zeros, bits, group, k):
    y = compiled_dequant_linear(x.reshape(-1, k), qweight, scales, zeros, bits, group, k)
    return y.view(*x.shape[:-1], -1)


# Decode-sized batches: torch's int8-weight GEMV kernel reads 1 byte per weight (4x less than
# dequantize-then-GEMM in fp32); past ~8-16 rows its per-row cost loses to the compiled dequant path.
INT8PACK_MAX_ROWS = 8
# torch's int4 kernel: 27 us against 1.6 ms for the compiled dequantizing matmul at 1 row of a
# 1536x576 group-32 weight, 0.7 against 1.6 ms at 64 rows, 5.3 against 1.9 ms at 512 (dev machine).
INT4PACK_MAX_ROWS = 128


def to_signed_int8(qw: QuantizedWeight) -> QuantizedWeight:
    """Per-channel 8-bit weights as int8 (q - 128, zero point - 128): same w = (q - z) * s, in the
    layout torch._weight_int8pack_mm takes (CPU only; the Triton kernel reads uint8)."""
    assert qw.bits == 8 and qw.scales.shape[1] == 1
    q = (qw.qweight.to(torch.int16) - 128).to(torch.int8)
    return QuantizedWeight(q, qw.scales, qw.zeros - 128, 8, qw.group_size, qw.shape)


def int8pack_linear(x: torch.Tensor, q: torch.Tensor, scales_bf16: torch.Tensor, zero_term: torch.Tensor):
    """x @ ((q - z) * s)^T = s * (x @ q^T) - (s * z) * rowsum(x), with the first term from torch's int8 GEMV
    (per-channel scales in x's dtype) and the zero-point term (zero_term = s * z) in fp32. Few ops: at
    batch 1 each one costs about as much as a small GEMV."""
    flat = x.reshape(-1, x.shape[-1])
    y = torch._weight_int8pack_mm(flat, q, scales_bf16).float()
    y = torch.addcmul(y, flat.sum(-1, keepdim=True, dtype=torch.float32), zero_term, value=-1.0)
    return y.to(x.dtype).view(*x.shape[:-1], q.shape[0])


def a8w8_linear(x: torch.Tensor, w_int8_t: torch.Tensor, w_scale: torch.Tensor) -> torch.Tensor:
    """Per-token symmetric int8 activations x per-channel int8 weights, int32 accumulation."""
    flat = x.reshape(-1, x.shape[-1]).float()
    x_scale = (flat.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-8)
    x_int8 = torch.round(flat / x_scale).clamp(-127, 127).to(torch.int8)
    rows = x_int8.shape[0]
    pad = (17 - rows) if (x.is_cuda and rows <= 16) else 0  # cuBLAS int8 GEMM wants more than 16 rows
    if pad:
        x_int8 = F.pad(x_int8, (0, 0, 0, pad))
    if x.is_cuda or int8_gemm_works():
        acc = torch._int_mm(x_int8, w_int8_t)[:rows]
    else:  # exact below 2**24 per sum, and within fp32 rounding beyond: far below the quantization error
        acc = torch.matmul(x_int8.float(), w_int8_t.float())
    y = acc.float() * x_scale * w_scale[None, :]
    return y.to(x.dtype).view(*x.shape[:-1], w_int8_t.shape[1])


def quantize_model(model: nn.Module, mode: str, group_size: int | None, device: torch.device) -> None:
    """Replace every Linear of `model` by a QuantizedLinear of the given mode (in place)."""
    if mode not in QUANT_MODES:
        raise InvalidParameterError("quantization", f"must be one of {sorted(QUANT_MODES)} or None, got {mode!r}")
    bits, act = QUANT_MODES[mode]
    if act and group_size is not None:
        raise InvalidParameterError("group_size", "a8w8 quantizes per channel; leave group_size unset")
    for name, module in list(model.named_modules()):
        if hasattr(module, "drop_stacked_experts"):  # MoE: its experts are about to be replaced
            module.drop_stacked_experts()
        for child_name, child in list(module.named_children()):
            if isinstance(child, Linear) and not getattr(child, "keep_full_precision", False):  # MoE routers
                qw = quantize(child.weight.data, bits, group_size)
                if device.type == "cpu" and bits == 8 and not act and group_size is None and \
                        child.weight.dtype == torch.bfloat16 and int8_gemv_works():
                    qw = to_signed_int8(qw)
                bias = None if child.bias is None else child.bias.data
                # The down projection's inputs (SiLU(gate) * up) carry outliers that per-token int8
                # cannot hold (SmolLM2 answers garbage): it keeps int8 weights with float activations.
                projection = name.rsplit(".", 1)[-1] if child_name == "base" else child_name  # LoRA-wrapped
                int8_acts = act and projection != "down_proj"
                setattr(module, child_name, QuantizedLinear(qw, bias, child.shard_sizes, child.weight.dtype,
                                                            int8_acts).to(device))
