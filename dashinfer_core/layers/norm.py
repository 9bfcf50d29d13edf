"""RMSNorm, with the residual add fused in (the next norm's input is always residual + output)."""
from __future__ import annotations

import torch
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
        # Same op order as HF's LlamaRMSNorm so fp32 results match bit for bit.
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        out = self.weight * h.to(input_dtype)
        return out if residual is None else (out, residual)
