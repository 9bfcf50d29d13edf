"""ForwardContext: the per-step state every layer reads besides its weights and the hidden states.

The runner (and the CUDA-graph capture) build one per forward with `forward_context`; the model hands
it to each layer. A new capability that layers need per step (LoRA slot indices, image embeddings)
adds a field here, not an argument to every forward.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..cache.kv_cache import KVLayer
from . import use_triton_ops
from .attention import AttentionBackend, AttentionMetadata
from .rotary import RotaryEmbedding


@dataclass
class ForwardContext:
    positions: torch.Tensor  # [T] int64: each token's position in its sequence
    attn_meta: AttentionMetadata
    backend: AttentionBackend
    kv_layers: list[KVLayer]  # one per decoder layer
    rotary: RotaryEmbedding
    # (cos, sin) [T, 1, D/2] gathered once per step and shared by every layer (CPU); None where the
    # rotary kernel reads rotary's tables itself (CUDA).
    cos_sin: tuple[torch.Tensor, torch.Tensor] | None
    # Vision-language models: (token indices [K], embeddings [K, hidden]) replacing those tokens'
    # embeddings (the image tokens of this step), or None.
    mm_embeds: tuple[torch.Tensor, torch.Tensor] | None = None


def forward_context(*, positions: torch.Tensor, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, num_decodes: int, backend: AttentionBackend,
                    kv_layers: list[KVLayer], rotary: RotaryEmbedding, query_start_loc_host: list[int] | None = None,
                    seq_lens_host: list[int] | None = None, mrope_positions: torch.Tensor | None = None,
                    mm_embeds=None, slot_mapping_host=None, block_tables_host=None,
                    positions_host: np.ndarray | None = None) -> ForwardContext:
    """The step's attention metadata, the backend's per-step preparation and the rotary inputs, in
    one place. mrope_positions: [3, T] for an M-RoPE model (its rotary reads these, not `positions`).
    positions_host: `positions` as a host array, where the step was planned on the host (CPU tables
    are then indexed in numpy)."""
    meta = AttentionMetadata.build(slot_mapping, query_start_loc, seq_lens, block_tables, num_decodes,
                                   query_start_loc_host, seq_lens_host, slot_mapping_host, block_tables_host)
    backend.prepare(meta, kv_layers[0])
    if mrope_positions is not None:  # the Triton rotary kernel takes one row: M-RoPE is rotated in torch
        return ForwardContext(positions=positions, attn_meta=meta, backend=backend, kv_layers=kv_layers,
                              rotary=rotary, cos_sin=rotary.cos_sin(mrope_positions), mm_embeds=mm_embeds)
    if use_triton_ops(positions):
        cos_sin = None
    elif positions_host is not None:  # (on the CPU: CUDA steps took the branch above)
        cos_sin = rotary.cos_sin_host(positions_host)
    else:
        cos_sin = rotary.cos_sin(positions)
    return ForwardContext(positions=positions, attn_meta=meta, backend=backend, kv_layers=kv_layers, rotary=rotary,
                          cos_sin=cos_sin, mm_embeds=mm_embeds)
