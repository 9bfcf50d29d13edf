"""SiLU-and-mul: the gated MLP's activation on the fused [gate | up] projection."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import use_triton_ops


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if use_triton_ops(gate_up):
        from dashinfer_kernels.silu_mul import silu_mul
        return silu_mul(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate).mul_(up)  # in place: one [rows, intermediate] temporary fewer (eager fp32 prefill)
