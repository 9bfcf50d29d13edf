"""QuantizedLinear: a Linear whose weight is stored quantized (weight-only int8/int4, or int8 with
int8 activations, "A8W8"), and the switch that converts a loaded model's linear layers."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import (INT4_GROUPS, compile_works, disabled_paths, int4_gemv_works, int4pack_block,
                            int8_gemm_works, int8_gemv_works, native_bf16)
from ..compiling import compile_or_eager
from ..errors import InvalidParameterError, UnsupportedModelError
from ..layers import use_triton_ops
from ..layers.linear import Linear
from .weights import QuantizedWeight, concat, dequantize, pack_int4, quantize, unpack_int4, unpacked

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
        # Groups on the CPU with bf16: torch's int4 kernel at decode sizes (int4pack_parts). Where its packing
        # is the known layout, 4-bit weights keep only that copy (the dequantizing matmul reads it for
        # prefill). Not for fp32: the kernel's fp32 code is ~20x slower than its bf16 one, and bf16
        # activations would end fp32's exact match with the dequantized model.
        parts = int4pack_parts(qw) if compute_dtype == torch.bfloat16 else None
        self.int4_parts = 0 if parts is None else len(parts)
        self.int4pack_max_numel = int4pack_max_rows() * self.in_features if parts else 0
        # Read once: a capability probe called inside a compiled graph is a graph break. So is the first
        # `.active` of the compiled dequant forms (it asks compile_works): settle both here, not in forward.
        self.emulated_bf16 = not native_bf16()
        if qw.qweight.device.type == "cpu":
            _ = compiled_dequant_linear.active, compiled_dequant_gemv.active
        for i in range(2):
            self.register_buffer(f"int4_packed{i}", parts[i][0] if parts and i < len(parts) else None)
            self.register_buffer(f"int4_scales_zeros{i}", parts[i][1] if parts and i < len(parts) else None)
        self.int4pack_block = int4pack_block() if parts else 0
        if parts and qw.bits == 4 and self.int4pack_block and qw.shape[0] % self.int4pack_block == 0:
            self.qweight = None
        # fp32 on the CPU: 4-bit integers kept one per byte, which the compiled GEMV reads ~6x faster than
        # nibbles (inductor does not vectorize the unpacking): 1591 against 258 us for a 3072x576 weight.
        self.storage_bits = qw.bits
        if qw.bits == 4 and compute_dtype == torch.float32 and qw.qweight.device.type == "cpu":
            self.qweight, self.storage_bits = unpacked(qw).contiguous(), 8
        if activations_int8:  # symmetric int8 weight for torch._int_mm, [K, N] as it wants
            w = dequantize(qw)
            self.register_buffer("w_scale", (w.abs().amax(dim=1) / 127).clamp(min=1e-8))
            self.register_buffer("w_int8_t", torch.round(w / self.w_scale[:, None]).clamp(-127, 127)
                                 .to(torch.int8).t().contiguous())

    def quantized(self) -> QuantizedWeight:
        qweight = self.qweight
        if qweight is None:  # only the int4 kernel's packing is kept
            qweight = pack_int4(unpack_int4pack(self.int4_packed0, self.out_features, self.in_features,
                                                 self.int4pack_block))
        elif self.storage_bits != self.bits:  # 4-bit integers one per byte
            qweight = pack_int4(qweight)
        return QuantizedWeight(qweight, self.scales, self.zeros, self.bits, self.group_size,
                               (self.out_features, self.in_features))

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows `index` of the weight in the compute dtype: a quantized embedding's lookup (per step: only
        the rows asked for are unpacked)."""
        k = self.in_features
        if self.qweight is None:  # the int4 kernel's packing: row r in block r // B, nibble (r % B) // (B / 2)
            block = self.int4pack_block
            blocks = self.int4_packed0.view(-1, k, block // 2)[index // block, :, index % (block // 2)]  # [T, K]
            q = torch.where((index % block >= block // 2)[:, None], blocks >> 4, blocks & 0x0F)
        elif self.storage_bits == 4:
            q = unpack_int4(self.qweight[index], k)
        else:
            q = self.qweight[index]
        qw = QuantizedWeight(q, self.scales[index], self.zeros[index], 8, self.group_size, (index.numel(), k))
        return dequantize(qw, self.compute_dtype)  # 8: the integers come unpacked

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.int4_parts and x.dtype == torch.bfloat16 and x.numel() <= self.int4pack_max_numel:
            flat = x.reshape(-1, self.in_features)
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.int4_packed0, self.group_size,
                                                           self.int4_scales_zeros0)
            if self.int4_parts == 2:
                y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.int4_packed1, self.group_size,
                                                                   self.int4_scales_zeros1)
            y = y.view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if self.qweight is None:
            dequant_linear = torch.ops.dashinfer.int4pack_dequant_linear if torch.compiler.is_compiling() else \
                _int4pack_dequant_linear
            y = dequant_linear(x.reshape(-1, self.in_features), self.int4_packed0, self.scales, self.zeros,
                               self.group_size, self.int4pack_block,
                               x.dtype == torch.bfloat16 and self.emulated_bf16).view(*x.shape[:-1], -1)
            return y if self.bias is None else y + self.bias
        if self.activations_int8:
            y = a8w8_linear(x, self.w_int8_t, self.w_scale)
        elif self.qweight.dtype == torch.int8 and x.dtype == torch.bfloat16 and \
                x.numel() <= INT8PACK_MAX_ROWS * self.in_features:
            y = int8pack_linear(x, self.qweight, self.scales_bf16, self.zero_term)
        elif use_triton_ops(x):
            from dashinfer_kernels.dequant_gemm import dequant_gemm
            flat = x.reshape(-1, self.in_features)
            y = dequant_gemm(flat.contiguous(), self.qweight, self.scales, self.zeros, self.storage_bits, self.group_size,
                             self.out_features, self.in_features).view(*x.shape[:-1], self.out_features)
        else:
            y = cpu_dequant_linear(x, self.qweight, self.scales, self.zeros, self.storage_bits, self.group_size,
                                   self.in_features, x.dtype == torch.bfloat16 and self.emulated_bf16)
        return y if self.bias is None else y + self.bias


def _dequant_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                    group: int, k: int, fp32_gemm: bool = False) -> torch.Tensor:
    """x @ dequant(W)^T written without gathers, so torch.compile can fuse the dequantization into
    the matmul's loads instead of writing a full-precision weight first."""
    q = torch.stack((qweight & 0x0F, qweight >> 4), dim=-1).flatten(1) if bits == 4 else qweight
    n, groups = q.shape[0], scales.shape[1]
    width = groups * group
    q = q[:, :width] if q.shape[1] >= width else F.pad(q, (0, width - q.shape[1]))
    w = ((q.view(n, groups, group).float() - zeros[..., None]) * scales[..., None]).view(n, width)[:, :k]
    if fp32_gemm:  # a CPU without bf16 arithmetic emulates a bf16 GEMM: multiply in fp32
        return torch.matmul(x.float(), w.t()).to(x.dtype)
    return torch.matmul(x, w.to(x.dtype).t())


def _int4pack_dequant_linear(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                             group: int, block: int, fp32_gemm: bool = False) -> torch.Tensor:
    """x @ dequant(W)^T with W's integers read from the int4 kernel's packing (see unpack_int4pack).
    fp32_gemm: multiply in fp32 (a CPU without bf16 arithmetic, where a bf16 GEMM is emulated). Run eager
    (inside compiled graphs as the operator below): inductor's code for the packing's transposed unpack is
    3-7x slower than these ops (3072x576 group 32, 300 rows, 2 threads: 34.1 against 9.4 ms on an AVX-512 bf16
    EPYC; 63 against 34 ms with AVX2 only; traced into the prefill graphs on an AVX2-only EPYC, single stream
    time to first token went from ~1.1 to ~4 s)."""
    n, k = scales.shape[0], x.shape[-1]
    q = unpack_int4pack(packed, n, k, block)
    w = ((q.view(n, k // group, group).float() - zeros[..., None]) * scales[..., None]).view(n, k)
    if fp32_gemm:
        return torch.matmul(x.float(), w.t()).to(x.dtype)
    return torch.matmul(x, w.to(x.dtype).t())


# A plain operator (as layers/linear.py's packed_linear): compiled graphs call it whole, without a graph break.
_LIBRARY = torch.library.Library("dashinfer", "FRAGMENT")
_LIBRARY.define("int4pack_dequant_linear(Tensor x, Tensor packed, Tensor scales, Tensor zeros, int group, "
                "int block, bool fp32_gemm) -> Tensor")
_LIBRARY.impl("int4pack_dequant_linear", _int4pack_dequant_linear, "CPU")
torch.library.register_fake("dashinfer::int4pack_dequant_linear",
                            lambda x, packed, scales, zeros, group, block, fp32_gemm:
                            x.new_empty((x.shape[0], scales.shape[0])), lib=_LIBRARY)


def _group_dots(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                group: int) -> torch.Tensor:
    """sum over groups of s * (x_g . q_g - z * sum(x_g)) in fp32, for x [m, groups * group]."""
    n, groups, m = qweight.shape[0], scales.shape[1], x.shape[0]
    xg = x.float().view(m, 1, groups, group)
    if bits == 4:  # even columns in the low nibbles, odd ones in the high: two dot products, no interleave
        packed = qweight.reshape(1, n, groups, group // 2)
        pairs = xg.view(m, 1, groups, group // 2, 2)
        dots = (pairs[..., 0] * (packed & 0x0F).float()).sum(-1) + (pairs[..., 1] * (packed >> 4).float()).sum(-1)
    else:
        dots = (xg * qweight.reshape(1, n, groups, group).float()).sum(-1)  # [m, n, groups]
    return ((dots - xg.sum(-1) * zeros[None]) * scales[None]).sum(-1)


def _dequant_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, bits: int,
                  group: int, k: int) -> torch.Tensor:
    """The same product for a few rows, as per-group dot products: sum_g s * (x_g . q_g - z * sum(x_g)).
    Compiled, it is one pass over the quantized weight with no dequantized copy (a GEMV reads each byte
    once; the matmul form writes and reads a full-precision weight first). A partial last group (k = 576
    in groups of 128) is a second, one-group product over the tail columns. For 4 bits, group and k even
    (gemv_serves)."""
    full = k // group
    head = full * group
    per_byte = 2 if bits == 4 else 1
    y = _group_dots(x[:, :head], qweight[:, :head // per_byte], scales[:, :full], zeros[:, :full], bits, group)
    if head < k:
        y = y + _group_dots(x[:, head:], qweight[:, head // per_byte:k // per_byte], scales[:, full:full + 1],
                            zeros[:, full:full + 1], bits, k - head)
    return y.to(x.dtype)


def gemv_serves(bits: int, group: int, k: int) -> bool:
    """The GEMV form's layout needs: whole bytes per group and per tail for 4-bit nibbles."""
    return bits == 8 or (group % 2 == 0 and k % 2 == 0)


def compiled_dequant_wanted() -> bool:
    return compile_works()[0] and "compiled_dequant" not in disabled_paths()


# The compiled form runs 4-25x faster than dequantize-then-GEMM on the CPU (measured on the dev
# machine); eager is the fallback where torch.compile is unavailable or fails.
compiled_dequant_linear = compile_or_eager(_dequant_linear, name="compiled dequant linear",
                                           enabled=compiled_dequant_wanted, dynamic=True)


compiled_dequant_gemv = compile_or_eager(_dequant_gemv, name="compiled dequant GEMV", enabled=compiled_dequant_wanted,
                                         dynamic=True)
# Up to this many rows the GEMV form wins (fp32, embedded model, AMX dev machine: the Q8_0 LM head 2.8
# against 35 ms at one row; past ~4 rows its cost, linear in rows, passes the matmul form's).
DEQUANT_GEMV_MAX_ROWS = 4


def cpu_dequant_linear(x, qweight, scales, zeros, bits, group, k, fp32_gemm: bool):
    """fp32_gemm: bf16 on a CPU without bf16 arithmetic (multiply in fp32)."""
    flat = x.reshape(-1, k)
    if flat.shape[0] <= DEQUANT_GEMV_MAX_ROWS and gemv_serves(bits, group, k) and compiled_dequant_gemv.active:
        return compiled_dequant_gemv(flat, qweight, scales, zeros, bits, group, k).view(*x.shape[:-1], -1)
    y = compiled_dequant_linear(flat, qweight, scales, zeros, bits, group, k, fp32_gemm)
    return y.view(*x.shape[:-1], -1)


# Decode-sized batches: torch's int8-weight GEMV kernel reads 1 byte per weight (4x less than
# dequantize-then-GEMM in fp32); past ~8-16 rows its per-row cost loses to the compiled dequant path.
INT8PACK_MAX_ROWS = 8
# torch's int4 kernel up to here, then dequantize-and-GEMM (its cost is mostly the fixed dequantization). A
# 3072x576 group-32 weight, 2 threads, kernel against the dequantizing matmul: AVX-512 bf16 EPYC 2.9 / 5.8 ms at
# 129 rows, 6.5 / 9.4 at 300, 10.9 / 11.0 at 512.
INT4PACK_MAX_ROWS = 512
# Without bf16 arithmetic the dequantizing matmul runs an fp32 GEMM, and the kernel's own bf16 code is slow: on
# an AVX2-only EPYC the four weights of an embedded-model layer took 11.1 / 12.3 ms at 64 rows, 21.1 / 16.8 at
# 128 and 51.2 / 28.9 at 320 (kernel / dequantizing matmul; 2 threads).
INT4PACK_MAX_ROWS_FP32_GEMM = 80


def int4pack_max_rows() -> int:
    """Rows up to which torch's int4 kernel serves a bf16 product on this CPU."""
    return INT4PACK_MAX_ROWS if native_bf16() else INT4PACK_MAX_ROWS_FP32_GEMM


def unpack_int4pack(packed: torch.Tensor, n: int, k: int, block: int) -> torch.Tensor:
    """The [n, k] integers of torch's CPU int4 packing: rows in blocks of B (64 for its AVX-512 kernel, 32
    for AVX2), stored [n / B, k, B / 2] bytes whose low nibble is row j and high nibble row j + B / 2 of the
    block (capabilities.int4pack_block finds B)."""
    b = packed.view(n // block, k, block // 2)
    return torch.stack((b & 0x0F, b >> 4), dim=1).transpose(2, 3).reshape(n, k)


def int4pack_parts(qw: QuantizedWeight) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """qw for torch's CPU int4 kernel, which computes bf16 x @ ((q - 8) * S + Z)^T per group: 4 bits
    as one (packed q, [S, Z]) part with S = s, Z = (8 - z) * s; 8 bits as two 4-bit halves, hi and lo
    of q = 16 hi + lo: (q - z) s = 16 s (hi - 8) + [s (lo - 8) + (136 - z) s]. None where the kernel
    does not serve (not the CPU, group sizes it lacks, per-channel or signed layouts, a failed probe)."""
    if qw.qweight.device.type != "cpu" or qw.qweight.dtype != torch.uint8 or qw.group_size not in INT4_GROUPS or \
            qw.shape[1] % qw.group_size or not int4_gemv_works():
        return None
    q, s, z = unpacked(qw).to(torch.int32), qw.scales, qw.zeros
    halves = [(q, s, (8 - z) * s)] if qw.bits == 4 else [(q >> 4, 16 * s, torch.zeros_like(s)),
                                                          (q & 0x0F, s, (136 - z) * s)]
    try:
        return [(torch.ops.aten._convert_weight_to_int4pack_for_cpu(h, 1),
                 torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(torch.bfloat16))
                for h, scale, zero in halves]
    except RuntimeError:  # a shape the kernel does not take: the dequantizing matmul serves it
        return None


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


def install_quantized(model: nn.Module, stash: dict[tuple[str, int], QuantizedWeight], source: str) -> None:
    """Replace each Linear whose shards came quantized from a checkpoint (GPTQ, GGUF) by a QuantizedLinear
    of them as they are. A layer whose shards differ in format (a GGUF that mixes types) or that has some
    shards dense keeps a dense weight: its quantized shards are dequantized into it."""
    by_layer: dict[str, dict[int, QuantizedWeight]] = {}
    for (path, shard), qw in stash.items():
        by_layer.setdefault(path, {})[shard] = qw
    for path, shards in by_layer.items():
        linear = model.get_submodule(path)
        first = next(iter(shards.values()))
        uniform = sorted(shards) == list(range(len(linear.shard_sizes))) and all(
            (q.bits, q.group_size) == (first.bits, first.group_size) for q in shards.values())
        if not uniform:
            if source == "GPTQ":
                raise UnsupportedModelError(f"GPTQ layer {path}: some projections are quantized and some not")
            for shard, qw in shards.items():
                linear.load("weight", dequantize(qw, linear.weight.dtype), shard)
            continue
        qw = concat([shards[i] for i in range(len(shards))])
        if qw.shape != (linear.out_features, linear.in_features):
            raise UnsupportedModelError(f"{source} layer {path}: shape {qw.shape} != "
                                        f"{(linear.out_features, linear.in_features)}")
        bias = None if linear.bias is None else linear.bias.data
        quantized = QuantizedLinear(qw, bias, linear.shard_sizes, linear.weight.dtype).to(linear.weight.device)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, quantized)
