"""SiLU-and-mul for the gated MLP: out = silu(gate) * up, where gate_up [T, 2I] = [gate | up].
silu is computed in float32 and rounded to the model dtype before the multiply (HF's bf16 order).
Grid (T, cdiv(I, BLOCK))."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_mul_kernel(gate_up_ptr, out_ptr, stride_in, stride_out, INTER: tl.constexpr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < INTER
    gate = tl.load(gate_up_ptr + t * stride_in + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + t * stride_in + INTER + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    tl.store(out_ptr + t * stride_out + cols, (act.to(tl.float32) * up.to(tl.float32)).to(gate.dtype), mask=mask)


def silu_mul(gate_up: torch.Tensor, out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    rows, double = gate_up.shape
    inter = double // 2
    if out is None:
        out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
    if rows == 0:
        return out
    assert gate_up.stride(1) == 1 and out.stride(1) == 1
    block = min(block, triton.next_power_of_2(inter))
    _silu_mul_kernel[(rows, triton.cdiv(inter, block))](gate_up, out, gate_up.stride(0), out.stride(0),
                                                         INTER=inter, BLOCK=block)
    return out


def silu_mul_ref(gate_up):
    gate, up = gate_up.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
