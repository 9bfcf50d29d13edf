"""TritonAttention: the dashinfer_kernels Triton kernels (KV store, split-KV paged decode, varlen paged
prefill). Nothing here reads device values on the host, so a decode step can be captured in a CUDA
graph. On the CPU it runs only under TRITON_INTERPRET=1 (tests)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ...cache.kv_cache import KVLayer
from .metadata import AttentionMetadata


@dataclass
class TritonStepState:
    num_splits: int  # context splits of the decode kernel (split-KV), chosen once per step


class TritonAttention:
    name = "triton"
    supports_cuda_graphs = True
    native_on_cpu = False

    def __init__(self, num_sms: int = 132):
        from dashinfer_kernels import kv_store, kv_store_quant, paged_decode_attention, paged_prefill_attention
        self._kv_store = kv_store.kv_store
        self._kv_store_quant = kv_store_quant.kv_store_quant
        self._decode = paged_decode_attention.paged_decode_attention
        self._choose_splits = paged_decode_attention.choose_num_splits
        self._prefill = paged_prefill_attention.paged_prefill_attention
        self.num_sms = num_sms

    @staticmethod
    def keys_transposed(device: torch.device, dtype: torch.dtype, kv_bits: int | None) -> bool:
        return False  # the kernels read [block_size, head_dim] tiles

    def prepare(self, meta: AttentionMetadata, kv_layer: KVLayer) -> None:
        num_kv_heads = kv_layer.shape[2]
        meta.backend_state = TritonStepState(num_splits=self._choose_splits(
            meta.num_decodes, num_kv_heads, meta.block_tables.shape[1], self.num_sms) if meta.num_decodes else 1)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: KVLayer,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        state: TritonStepState = meta.backend_state
        k_cache, v_cache = kv_layer.data[0], kv_layer.data[1]
        quant = None
        if kv_layer.bits:
            quant = (kv_layer.bits, kv_layer.scales[0], kv_layer.scales[1], kv_layer.zeros[0], kv_layer.zeros[1])
            self._kv_store_quant(k, v, k_cache, v_cache, quant[1], quant[2], quant[3], quant[4], meta.slot_mapping,
                                 kv_layer.bits)
        else:
            self._kv_store(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self._decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                         num_splits=state.num_splits, out=out[:nd], kv_quant=quant)
        if meta.num_seqs > nd:
            block_m = 64 if q.is_cuda else 16
            self._prefill(q, k_cache, v_cache, meta.block_tables[nd:], meta.seq_lens[nd:],
                          meta.query_start_loc[nd:], meta.max_query_len, scale, out=out, block_m=block_m,
                          kv_quant=quant)
        return out
