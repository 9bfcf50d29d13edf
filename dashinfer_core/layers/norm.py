"""RMSNorm, with the residual add fused in (the next norm's input is always residual + output)."""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from . import use_triton_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=dtype), requires_grad=False)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Returns norm(x) when residual is None, else (norm(x + residual), x + residual)."""
        if x.dim() == 2 and use_triton_ops(x):
            from dashinfer_kernels.rmsnorm import rmsnorm  # fused kernel: one pass, residual in place
            out = rmsnorm(x, self.weight, self.eps, residual=residual)
            return out if residual is None else (out, residual)
        if residual is not None:
            x = x + residual
            residual = x
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32 and not torch.compiler.is_compiling() \
                and fused_rms_norm_exact():  # (a compiled graph fuses the op-by-op form anyway)
            out = F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        else:
            out = op_by_op_rms_norm(x, self.weight, self.eps)
        return out if residual is None else (out, residual)


def op_by_op_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Same op order as HF's LlamaRMSNorm, so results match bit for bit."""
    input_dtype = x.dtype
    h = x.to(torch.float32)
    variance = h.pow(2).mean(-1, keepdim=True)
    h = h * torch.rsqrt(variance + eps)
    return weight * h.to(input_dtype)


@functools.cache
def fused_rms_norm_exact() -> bool:
    """Whether torch's rms_norm gives op_by_op_rms_norm's fp32 result bit for bit here. On the CPU it runs the
    same ops from C++ (aten::_fused_rms_norm), one Python call instead of six: an eager fp32 norm of a row of
    576 took 10.5 instead of 15.6 us (2-core AMD EPYC, warm), and a step pays one or two per layer. In
    bf16/fp16 it rounds elsewhere (HF multiplies by the weight in the input dtype): those keep op by op."""
    generator = torch.Generator().manual_seed(0)
    for rows, width in ((1, 64), (7, 576), (3, 4096)):
        x = torch.randn(rows, width, generator=generator) * 3
        weight = torch.randn(width, generator=generator)
        if not torch.equal(F.rms_norm(x, (width,), weight, 1e-6), op_by_op_rms_norm(x, weight, 1e-6)):
            return False
    return True
