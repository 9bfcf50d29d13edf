"""Rotary position embedding (HF's rotate-half layout) with the rope_scaling types default, linear
and llama3. cos/sin are tabulated once for every position up to the context limit."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..errors import UnsupportedModelError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    # Same arithmetic as transformers' rope init so fp32 cos/sin match bit for bit.
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float32) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    rope_type = scaling.get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        original_len = scaling["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        # Long wavelengths are slowed by `factor`, short ones kept, the band between blended.
        scaled = torch.where(wavelen > original_len / low_freq_factor, inv_freq / factor, inv_freq)
        smooth = (original_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        blended = (1 - smooth) * scaled / factor + smooth * scaled
        in_band = ~(wavelen < original_len / high_freq_factor) * ~(wavelen > original_len / low_freq_factor)
        return torch.where(in_band, blended, scaled)
    raise UnsupportedModelError(
        f"rope_scaling type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict, dtype: torch.dtype,
                 rotary_dim: int | None = None, interleaved: bool = False, mrope_section: tuple[int, ...] | None = None):
        """rotary_dim: the leading dims that rotate (GLM: half of head_dim), the rest pass through;
        interleaved: rotate pairs (x0, x1), (x2, x3), ... (GLM) instead of the two halves;
        mrope_section: M-RoPE (Qwen2-VL): positions come as [3, T] rows (temporal, height, width) and
        frequency i takes its angle from the row of the section it falls in."""
        super().__init__()
        self.rotary_dim = rotary_dim or head_dim
        self.interleaved = interleaved
        rows = None
        if mrope_section is not None:  # frequency index -> which position row drives it
            rows = torch.cat([torch.full((n,), i % 3, dtype=torch.int64) for i, n in enumerate(mrope_section)])
        self.register_buffer("mrope_rows", rows, persistent=False)
        # The Triton kernel rotates full-width halves by one position row; other layouts take the torch path.
        self.kernel_ok = self.rotary_dim == head_dim and not interleaved and mrope_section is None
        inv_freq = rope_inv_freq(self.rotary_dim, theta, scaling)
        positions = torch.arange(max_positions, dtype=torch.int64).to(torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        self.register_buffer("cos_cache", freqs.cos().to(dtype), persistent=False)  # [max_pos, D/2]
        self.register_buffer("sin_cache", freqs.sin().to(dtype), persistent=False)
        self._host_tables = None  # see cos_sin_host

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gathered once per step and shared by every layer: each [T, 1, D/2]. M-RoPE: positions [3, T]."""
        if self.mrope_rows is not None:
            if positions.dim() == 1:  # text only: the three rows are equal
                positions = positions.expand(3, -1)
            pick = self.mrope_rows[None, None, :].expand(1, positions.shape[1], -1)
            cos = self.cos_cache[positions].gather(0, pick)[0]  # [T, D/2]: row mrope_rows[i] for frequency i
            sin = self.sin_cache[positions].gather(0, pick)[0]
            return cos.unsqueeze(1), sin.unsqueeze(1)
        return self.cos_cache.index_select(0, positions).unsqueeze(1), self.sin_cache.index_select(0, positions).unsqueeze(1)

    def cos_sin_host(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """cos_sin of the step's host positions (CPU tables): numpy indexing of the same tables, then one
        wrap each; two small torch index_selects cost ~3x that after a forward has swept the caches."""
        tables = self._host_tables
        if tables is None or tables[0] is not self.cos_cache:  # (re-made if the buffers were replaced)
            tables = self._host_tables = (self.cos_cache, host_array(self.cos_cache), host_array(self.sin_cache))
        dtype = self.cos_cache.dtype
        return (torch.from_numpy(tables[1][positions]).view(dtype).unsqueeze(1),
                torch.from_numpy(tables[2][positions]).view(dtype).unsqueeze(1))

    def rotate(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
               cos_sin: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hkv, D]. With the step's gathered cos_sin, in torch; without
        (CUDA), in place by the Triton kernel from the full tables."""
        if cos_sin is None and not self.kernel_ok:
            cos_sin = self.cos_sin(positions)
        if cos_sin is not None:
            if self.kernel_ok:
                return apply_rotary(q, *cos_sin), apply_rotary(k, *cos_sin)
            return (apply_partial_rotary(q, *cos_sin, self.rotary_dim, self.interleaved),
                    apply_partial_rotary(k, *cos_sin, self.rotary_dim, self.interleaved))
        apply_rotary_inplace(q, k, positions, self)
        return q, k


def host_array(table: torch.Tensor) -> np.ndarray:
    """A CPU table as a numpy view (16-bit floats as int16: numpy has no bfloat16)."""
    return (table.view(torch.int16) if table.dtype.itemsize == 2 else table).numpy()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D]. Rotates the two halves: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def apply_partial_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int,
                         interleaved: bool) -> torch.Tensor:
    """Rotate the first rotary_dim dims of x (halves, or interleaved pairs as GLM does); the rest pass."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    if interleaved:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rot = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        rot = apply_rotary(rot, cos, sin)
    return torch.cat((rot, rest), dim=-1)


def apply_rotary_inplace(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, rope: RotaryEmbedding) -> None:
    """CUDA: rotate q and k in place with the Triton kernel (they may be views of the fused qkv)."""
    from dashinfer_kernels.rotary import rotary_inplace
    rotary_inplace(q, k, rope.cos_cache, rope.sin_cache, positions)
