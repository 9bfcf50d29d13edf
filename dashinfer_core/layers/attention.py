"""Attention over the paged KV cache, behind one backend interface.

Cache layout (per layer, K and V alike): [num_blocks, block_size, num_kv_heads, head_dim].
A step's batch is one varlen batch: sequences [0, num_decodes) contribute one query token each,
the rest contribute prefill chunks. Each backend first writes the step's K/V into the cache slots of
`slot_mapping`, then attends every query over its sequence's whole context (cached prefix + new
tokens) through `block_tables`.

`TorchAttention` is the CPU path and the reference; the Triton backend (dashinfer_kernels) plugs in
on CUDA through the same two methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64; -1 = padding, not stored
    query_start_loc: torch.Tensor  # [B + 1] int32 on the device
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    num_decodes: int  # sequences [0, num_decodes) have exactly one query token
    max_seq_len: int
    max_query_len: int
    # Host copies, for loops over the (few) prefill sequences.
    query_start_loc_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    # Per-step work a backend shares across layers (e.g. gathered block indices, masks).
    backend_state: dict = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        return len(self.seq_lens_host)


class TorchAttention:
    """Plain-torch paged attention: SDPA over K/V gathered block-wise from the cache."""

    name = "torch"

    def prepare(self, meta: AttentionMetadata, block_size: int) -> None:
        """Per-step precomputation shared by all layers."""
        state = meta.backend_state
        nd = meta.num_decodes
        if nd:
            lens = meta.seq_lens[:nd]
            max_len = int(max(meta.seq_lens_host[:nd]))
            num_blocks = -(-max_len // block_size)
            state["decode_blocks"] = meta.block_tables[:nd, :num_blocks].long()
            positions = torch.arange(num_blocks * block_size, device=lens.device)
            # [nd, 1, 1, L]: True where the key position is inside the sequence.
            state["decode_mask"] = (positions[None, :] < lens[:, None].long())[:, None, None, :]
        valid = meta.slot_mapping >= 0
        state["all_slots_valid"] = bool(valid.all()) if meta.slot_mapping.numel() else True
        if not state["all_slots_valid"]:
            state["valid_token_idx"] = valid.nonzero().squeeze(1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D] -> [T, Hq, D]."""
        store_kv(k, v, k_cache, v_cache, meta)
        out = torch.empty_like(q)
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        nd = meta.num_decodes
        if nd:
            state = meta.backend_state
            blocks = state["decode_blocks"]
            keys = k_cache[blocks].flatten(1, 2).transpose(1, 2)  # [nd, Hkv, L, D]
            values = v_cache[blocks].flatten(1, 2).transpose(1, 2)
            out[:nd] = F.scaled_dot_product_attention(
                q[:nd].unsqueeze(2), keys, values, attn_mask=state["decode_mask"], scale=scale,
                enable_gqa=True).squeeze(2)
        block_size = k_cache.shape[1]
        starts, lens = meta.query_start_loc_host, meta.seq_lens_host
        for i in range(nd, meta.num_seqs):
            start, end, ctx_len = starts[i], starts[i + 1], lens[i]
            num_new = end - start
            qi = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if ctx_len == num_new:  # no cached prefix: attend to this chunk's own K/V
                ki, vi = k[start:end], v[start:end]
                mask, causal = None, True
            else:
                blocks = meta.block_tables[i, : -(-ctx_len // block_size)].long()
                ki = k_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx_len]
                vi = v_cache[blocks].reshape(-1, num_kv_heads, head_dim)[:ctx_len]
                # Query j sits at position ctx_len - num_new + j and sees keys up to there.
                q_pos = torch.arange(ctx_len - num_new, ctx_len, device=q.device)
                mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
                causal = False
            oi = F.scaled_dot_product_attention(
                qi, ki.transpose(0, 1).unsqueeze(0), vi.transpose(0, 1).unsqueeze(0), attn_mask=mask,
                is_causal=causal, scale=scale, enable_gqa=True)
            out[start:end] = oi.squeeze(0).transpose(0, 1)
        return out


def store_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata) -> None:
    slots = meta.slot_mapping
    if not meta.backend_state.get("all_slots_valid", True):
        keep = meta.backend_state["valid_token_idx"]
        slots, k, v = slots[keep], k[keep], v[keep]
    k_cache.view(-1, *k.shape[1:]).index_copy_(0, slots, k)
    v_cache.view(-1, *v.shape[1:]).index_copy_(0, slots, v)
