"""Linear layers. A merged linear holds several HF projections side by side (q|k|v, gate|up) so one
matmul serves them; the loader fills each shard from its own HF tensor."""
from __future__ import annotations

import time
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import drop_onednn_dtype, native_bf16, onednn_linear_on

# On x86 CPUs oneDNN's GEMM runs 2-3x faster than the MKL sgemm behind F.linear (measured on the
# AMD EPYC dev machine: 450 vs 210 GFLOP/s fp32 at 512 rows), for the same fp32 arithmetic. Which
# dtypes it can run here is probed once (capabilities.py): bf16 needs avx512_bf16 or AMX.
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


# ---- prepacked bf16 / fp32 weights (the packed_linear fast path) ---------------------------------------
# oneDNN computes on weights in its own blocked layout; handed a plain one it reorders it on every call
# (~20 us a call for a small layer, about the GEMV itself for the LM head). packed_parameter() reorders a
# weight once; the layer then keeps only a placeholder (the shape, no data) and the packed tensor lives
# here, keyed by the placeholder's address. Inside compiled graphs the product is an opaque custom op:
# inductor can neither trace an oneDNN packed tensor nor run its own GEMM on one.
_PACKED: dict[int, tuple[weakref.ref, torch.Tensor]] = {}


def placeholder_of(weight: torch.Tensor) -> torch.Tensor:
    """A [N, K] tensor of one element (strides 0) standing for a packed weight: no memory, its own address."""
    return torch.empty(1, dtype=weight.dtype, device=weight.device).expand(weight.shape)


def packed_parameter(weight: torch.Tensor) -> nn.Parameter:
    """The placeholder parameter that replaces `weight`, its oneDNN packed copy kept in _PACKED until the
    placeholder is gone."""
    key = nn.Parameter(placeholder_of(weight), requires_grad=False)
    address = key.data_ptr()
    _PACKED[address] = (weakref.ref(key), torch.ops.mkldnn._reorder_linear_weight(weight.detach()))
    weakref.finalize(key, _PACKED.pop, address, None)
    return key


def _packed_of(weight: torch.Tensor) -> torch.Tensor:
    entry = _PACKED.get(weight.data_ptr())
    owner = entry[0]() if entry is not None else None
    if owner is None or owner.shape != weight.shape:
        raise RuntimeError(f"no packed weight for a {tuple(weight.shape)} placeholder (was the layer copied?)")
    return entry[1]


def _run_packed(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return _ONEDNN_LINEAR(x, _packed_of(weight), bias, "none", [], "")


# Declared with torch.library.Library, not torch.library.custom_op: custom_op's Python wrapper around the
# kernel cost ~8 us a call eagerly and ~3 us inside a compiled graph here (Xeon, 2 threads), paid by ~120
# products a step; a plain operator adds ~0.7 us to the oneDNN call. Inference only (no autograd kernel).
_LIBRARY = torch.library.Library("dashinfer", "DEF")
_LIBRARY.define("packed_linear(Tensor x, Tensor weight, Tensor? bias) -> Tensor")
_LIBRARY.impl("packed_linear", _run_packed, "CPU")


def _packed_linear_shape(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


torch.library.register_fake("dashinfer::packed_linear", _packed_linear_shape, lib=_LIBRARY)


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) for a weight replaced by packed_parameter (`weight`: that placeholder)."""
    if torch.compiler.is_compiling():
        return torch.ops.dashinfer.packed_linear(x, weight, bias)
    return _run_packed(x, weight, bias)  # eagerly without the custom op's dispatch (~10 us a call)


# Without bf16 arithmetic (AVX2, AVX-512 without avx512_bf16) torch's bf16 GEMM is emulated and slow past one row:
# on an AVX2-only EPYC, 1 thread, a [1536, 576] weight took 1.53 ms at 8 rows and 12.2 at 64 (fp32: 0.34, 1.53), the
# embedded model's LM head 415 ms at 64 rows. There the weight is widened to fp32 in chunks of this many elements
# (4 MB: the widened copy stays in cache, and no large buffer is faulted in each call) and the fp32 GEMM runs:
# 0.49 / 1.84 ms, and 68 ms for the LM head (19 against 50 ms at 8 rows; one row stays bf16: 8.7 against 14.9).
UPCAST_CHUNK_ELEMENTS = 1 << 20
# Set by Linear.__init__ (eagerly, at model construction): a capability probe called inside a compiled graph is
# a graph break.
_bf16_emulated = False


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) for bf16 x and W, computed in fp32 (the weight widened a chunk of rows at a time)."""
    flat = x.reshape(-1, x.shape[-1]).float()
    n, k = weight.shape
    step = max(1, UPCAST_CHUNK_ELEMENTS // k)
    if n <= step:
        y = F.linear(flat, weight.float(), None if bias is None else bias.float())
    else:
        y = torch.cat([F.linear(flat, weight[start:start + step].float()) for start in range(0, n, step)], dim=1)
        if bias is not None:
            y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if _bf16_emulated and x.dtype == torch.bfloat16 and x.numel() > x.shape[-1] and x.device.type == "cpu":
        return upcast_linear(x, weight, bias)
    # Inside torch.compile (models/compiled.py) inductor cannot lower the oneDNN op; F.linear there.
    if not torch.compiler.is_compiling() and x.device.type == "cpu" and onednn_linear_on(x.dtype):
        one_fp32_row = x.dtype == torch.float32 and x.numel() == x.shape[-1]
        if not one_fp32_row or onednn_gemv_faster(x, weight, bias):
            try:
                return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")
            except RuntimeError as exc:  # a shape the probe did not cover: never fail the request for it
                drop_onednn_dtype(x.dtype, exc)
    return F.linear(x, weight, bias)


# One fp32 row (single-stream decode) is a GEMV, where the faster of MKL's (F.linear) and oneDNN's
# differs by CPU and by shape. Timed once per weight shape, on its first single-row call, with the weight
# out of the caches before every timed call, as it is in a decode step (the step reads every weight once;
# hot repeats picked MKL where it is 1.1-2.3x slower cold: embedded model's gate_up 607 vs 266 us).
_gemv_choice: dict[tuple, bool] = {}
EVICT_BYTES = 64 << 20  # more than the last-level cache of the CPUs we run on


def onednn_gemv_faster(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    key = (tuple(weight.shape), bias is not None)
    choice = _gemv_choice.get(key)
    if choice is None:
        def onednn():
            return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")

        def mkl():
            return F.linear(x, weight, bias)

        scratch = torch.empty(EVICT_BYTES, dtype=torch.uint8)
        best = {onednn: float("inf"), mkl: float("inf")}
        try:
            onednn()  # oneDNN builds its primitive on the first call
        except RuntimeError:
            best.pop(onednn)
        for _ in range(5):  # alternated, so a noisy moment does not favour one of them
            for fn in best:
                scratch.fill_(1)
                start = time.perf_counter()
                fn()
                best[fn] = min(best[fn], time.perf_counter() - start)
        choice = _gemv_choice[key] = best.get(onednn, float("inf")) < best[mkl]
    return choice


# fp32 weights of up to this many elements stay plain, for F.linear (MKL): oneDNN's fixed cost per call (~15 us)
# is most of such a product, where F.linear's is a few us. AMD EPYC, 2 threads, a
# 20 us gap before each call as in a step (packed against F.linear, median us): [64, 192] weight 28.7/7.8 at 1
# row, 37.7/26.1 at 64, 61.1/53.9 at 256; [64, 64] 16.2/3.9 and 21.8/11.2; [256, 256] (65,536) 21.0/10.8 at 1
# row but 60.7/70.6 at 64. bf16 stays packed: there oneDNN's product was as fast or faster at every size.
SMALL_FP32_WEIGHT = 16384


class Linear(nn.Module):
    """Tensor parallel: a column-parallel layer holds, of each shard, the rows starting at
    shard_offsets[i] of the HF tensor; a row-parallel one holds the input columns from in_offset
    (its partial outputs are summed across ranks by the model, and its bias is added on rank 0 only)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                 shard_sizes: tuple[int, ...] | None = None, shard_offsets: tuple[int, ...] | None = None,
                 in_offset: int | None = None, first_rank: bool = True):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shard_sizes = shard_sizes or (out_features,)
        assert sum(self.shard_sizes) == out_features
        self.shard_offsets = shard_offsets  # None: each shard is its whole HF tensor
        self.in_offset = in_offset  # None: all input columns
        self.first_rank = first_rank  # row-parallel: the rank that adds the bias
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) if bias else None
        self.packed = False  # pack(): the weight is a placeholder, its packed copy in _PACKED
        if dtype == torch.bfloat16:
            global _bf16_emulated
            _bf16_emulated = not native_bf16()
        self.mkl_small = False  # pack() left a small fp32 weight plain: F.linear (MKL) runs it

    def shard_range(self, shard: int) -> tuple[int, int]:
        start = sum(self.shard_sizes[:shard])
        return start, start + self.shard_sizes[shard]

    def load(self, name: str, tensor: torch.Tensor, shard: int = 0) -> None:
        """Copy (this rank's part of) an HF weight or bias into shard `shard` of this layer."""
        target = self.weight if name == "weight" else self.bias
        if target is None:
            raise ValueError(f"checkpoint has a bias for a layer built without one ({tensor.shape})")
        start, end = self.shard_range(shard)
        if self.shard_offsets is not None:
            offset = self.shard_offsets[shard]
            tensor = tensor[offset:offset + end - start]
        if self.in_offset is not None:
            if name == "weight":
                tensor = tensor[:, self.in_offset:self.in_offset + self.in_features]
            elif not self.first_rank:  # the partial outputs are summed: add the bias once
                tensor = torch.zeros_like(tensor)
        expected = (end - start,) + tuple(target.shape[1:])
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} shard {shard}: checkpoint shape {tuple(tensor.shape)} != {expected}")
        target.data[start:end].copy_(tensor)

    def pack(self) -> None:
        """Reorder the weight once into oneDNN's layout (CPU, bf16 or fp32; see _PACKED); the plain copy is dropped.
        A small fp32 weight stays plain for MKL instead (SMALL_FP32_WEIGHT)."""
        if self.weight.dtype == torch.float32 and self.weight.numel() <= SMALL_FP32_WEIGHT:
            self.mkl_small = True
            return
        self.weight = packed_parameter(self.weight)
        self.packed = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return packed_linear(x, self.weight, self.bias)
        if self.mkl_small:
            return F.linear(x, self.weight, self.bias)
        return linear(x, self.weight, self.bias)
