"""The Qwen2-VL / Qwen2.5-VL vision tower: image patches -> one embedding per merged 2x2 patch block, in
the language model's hidden size. Weight names follow the checkpoints (visual.*).

    patch embedding    a linear map of each flattened [channels, frames, 14, 14] patch (HF: a Conv3d
                       whose kernel equals its stride, i.e. the same map)
    blocks             pre-norm attention + MLP; 2D rotary (row and column positions, each on a quarter
                       of the head dim); attention within each image, or with Qwen2.5-VL within 112-pixel
                       windows except in the full-attention blocks
    merger             norm, then the 2x2 block of patches concatenated and projected by a 2-layer MLP

Qwen2-VL: LayerNorm, fc1 -> quick_gelu -> fc2. Qwen2.5-VL: RMSNorm, gate/up/down with SiLU, windows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..layers.linear import linear


class Linear(nn.Linear):
    """nn.Linear through the engine's linear (oneDNN on x86 CPUs where the probe allows it)."""

    def forward(self, x):
        return linear(x, self.weight, self.bias)


@dataclass
class VisionConfig:
    depth: int
    embed_dim: int
    out_dim: int  # the language model's hidden size
    num_heads: int
    mlp_dim: int
    act: str
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    merge: int
    rope_theta: float
    qwen25: bool  # RMSNorm, gated MLP, windowed attention
    window_size: int = 0
    full_attention_blocks: tuple[int, ...] = ()

    @classmethod
    def from_hf(cls, raw: dict, qwen25: bool) -> "VisionConfig":
        theta = float((raw.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        common = dict(depth=raw["depth"], num_heads=raw["num_heads"], patch_size=raw.get("patch_size", 14),
                      temporal_patch_size=raw.get("temporal_patch_size", 2), in_channels=raw.get("in_channels", 3),
                      merge=raw.get("spatial_merge_size", 2), rope_theta=theta, qwen25=qwen25)
        if qwen25:
            return cls(embed_dim=raw["hidden_size"], out_dim=raw["out_hidden_size"], mlp_dim=raw["intermediate_size"],
                       act=raw.get("hidden_act", "silu"), window_size=raw.get("window_size", 112),
                       full_attention_blocks=tuple(raw.get("fullatt_block_indexes") or ()), **common)
        return cls(embed_dim=raw["embed_dim"], out_dim=raw["hidden_size"],
                   mlp_dim=int(raw["embed_dim"] * raw.get("mlp_ratio", 4)), act=raw.get("hidden_act", "quick_gelu"),
                   **common)


def activation(name: str):
    if name == "quick_gelu":
        return lambda x: x * torch.sigmoid(1.702 * x)
    if name == "silu":
        return F.silu
    if name in ("gelu", "gelu_pytorch_tanh"):
        return (lambda x: F.gelu(x, approximate="tanh")) if name.endswith("tanh") else F.gelu
    raise ValueError(f"vision hidden_act {name!r} is not supported")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        return self.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def _norm(cfg: VisionConfig, dim: int) -> nn.Module:
    return RMSNorm(dim) if cfg.qwen25 else nn.LayerNorm(dim, eps=1e-6)


class _Named(nn.Module):
    """A container whose only job is the checkpoint's name for a child (patch_embed.proj)."""

    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            setattr(self, name, child)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.embed_dim // cfg.num_heads
        self.qkv = Linear(cfg.embed_dim, 3 * cfg.embed_dim)
        self.proj = Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x, cos, sin, bounds: list[int]):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        out = torch.empty_like(q)
        for start, end in zip(bounds[:-1], bounds[1:]):  # each image (or window) attends within itself
            seg = [t[start:end].transpose(0, 1)[None] for t in (q, k, v)]
            out[start:end] = F.scaled_dot_product_attention(*seg)[0].transpose(0, 1)
        return self.proj(out.reshape(n, -1))


def rotate(x, cos, sin):
    """2D rotary on the whole head dim (halves), in float32 as HF does."""
    h = x.float()
    x1, x2 = h.chunk(2, dim=-1)
    return (h * cos + torch.cat((-x2, x1), dim=-1) * sin).to(x.dtype)


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = _norm(cfg, cfg.embed_dim)
        self.norm2 = _norm(cfg, cfg.embed_dim)
        self.attn = VisionAttention(cfg)
        self.act = activation(cfg.act)
        self.gated = cfg.qwen25
        if cfg.qwen25:
            self.mlp = _Named(gate_proj=Linear(cfg.embed_dim, cfg.mlp_dim),
                              up_proj=Linear(cfg.embed_dim, cfg.mlp_dim),
                              down_proj=Linear(cfg.mlp_dim, cfg.embed_dim))
        else:
            self.mlp = _Named(fc1=Linear(cfg.embed_dim, cfg.mlp_dim), fc2=Linear(cfg.mlp_dim, cfg.embed_dim))

    def forward(self, x, cos, sin, bounds):
        x = x + self.attn(self.norm1(x), cos, sin, bounds)
        h = self.norm2(x)
        m = self.mlp
        h = m.down_proj(self.act(m.gate_proj(h)) * m.up_proj(h)) if self.gated else m.fc2(self.act(m.fc1(h)))
        return x + h


class VisionTower(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.spatial_merge_size = cfg.merge
        self.patch_embed = _Named(proj=nn.Conv3d(cfg.in_channels, cfg.embed_dim, bias=False, kernel_size=(
            cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        merged = cfg.embed_dim * cfg.merge ** 2
        self.merger = _Named(ln_q=_norm(cfg, cfg.embed_dim),
                             mlp=nn.Sequential(Linear(merged, merged), nn.GELU(), Linear(merged, cfg.out_dim)))
        self.rotary_half = cfg.embed_dim // cfg.num_heads // 2  # head dims per axis (rows, columns)

    def forward(self, pixels: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> torch.Tensor:
        """pixels [patches, C*T*P*P] of the images of grid_thw, in the image processor's order ->
        [merged patches, out_dim] in the same order."""
        cfg = self.cfg
        weight = self.patch_embed.proj.weight
        x = F.linear(pixels.to(weight.dtype), weight.view(weight.shape[0], -1))
        cos, sin = self._rotary(grid_thw)
        image_bounds = [0]
        for t, h, w in grid_thw:
            image_bounds += [image_bounds[-1] + h * w * (i + 1) for i in range(t)]
        order = None
        if cfg.qwen25:  # reorder into windows (groups of whole 2x2 merge blocks), undone after the merger
            order, window_bounds = self._windows(grid_thw)
            unit = cfg.merge ** 2
            regroup = lambda a: a.view(-1, unit, a.shape[-1])[order].reshape(a.shape)  # noqa: E731
            x, cos, sin = regroup(x), regroup(cos), regroup(sin)
        cos, sin = cos[:, None, :], sin[:, None, :]
        for i, block in enumerate(self.blocks):
            windowed = cfg.qwen25 and i not in cfg.full_attention_blocks
            x = block(x, cos, sin, window_bounds if windowed else image_bounds)
        out = self.merger.mlp(self.merger.ln_q(x).view(-1, cfg.embed_dim * cfg.merge ** 2))
        return out if order is None else out[torch.argsort(order)]

    def _rotary(self, grid_thw):
        """cos, sin [patches, head_dim]: a patch's row angle on the first quarter, its column angle on the
        second, both repeated for the other half; patches ordered by 2x2 merge block, as the processor does."""
        m = self.cfg.merge
        rows = []
        for t, h, w in grid_thw:
            hpos = torch.arange(h)[:, None].expand(h, w).reshape(h // m, m, w // m, m).transpose(1, 2).reshape(-1)
            wpos = torch.arange(w)[None, :].expand(h, w).reshape(h // m, m, w // m, m).transpose(1, 2).reshape(-1)
            rows.append(torch.stack([hpos, wpos], dim=-1).repeat(t, 1))
        device = self.patch_embed.proj.weight.device
        half = self.rotary_half  # float32 whatever the model dtype, as HF keeps its inv_freq
        inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float32, device=device) / half))
        pos = torch.cat(rows).to(device)
        freqs = (pos[..., None].float() * inv_freq).flatten(1)  # [N, half]: row angles, then column angles
        freqs = torch.cat([freqs, freqs], dim=-1)
        return freqs.cos(), freqs.sin()

    def _windows(self, grid_thw):
        """Qwen2.5-VL: the merge blocks reordered window by window (windows of window_size pixels, cut at
        the image's edge) and the window boundaries in patches."""
        cfg = self.cfg
        side = cfg.window_size // cfg.merge // cfg.patch_size  # merge blocks per window side
        unit = cfg.merge ** 2
        order, bounds, base = [], [0], 0
        for t, h, w in grid_thw:
            gh, gw = h // cfg.merge, w // cfg.merge
            index = torch.arange(t * gh * gw).view(t, gh, gw)
            for frame in range(t):
                for r in range(0, gh, side):
                    for c in range(0, gw, side):
                        block = index[frame, r:r + side, c:c + side].reshape(-1)
                        order.append(block + base)
                        bounds.append(bounds[-1] + block.numel() * unit)
            base += t * gh * gw
        return torch.cat(order).to(self.patch_embed.proj.weight.device), bounds
