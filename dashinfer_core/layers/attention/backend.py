"""The interface every attention backend implements, with the capability flags the runner reads
(instead of comparing backend names)."""
from __future__ import annotations

from typing import Protocol

import torch

from ...cache.kv_cache import KVLayer
from .metadata import AttentionMetadata


class AttentionBackend(Protocol):
    name: str
    # A decode step's forward reads no device value on the host, so it can be captured in a CUDA graph.
    supports_cuda_graphs: bool
    # Runs natively on the CPU (Triton runs there only interpreted, for tests), so the decoder
    # layers around it may be torch.compile'd (models/compiled.py).
    native_on_cpu: bool

    def keys_transposed(self, device: torch.device, dtype: torch.dtype, kv_bits: int | None) -> bool:
        """The KV cache this backend reads holds K transposed per (block, head) chunk (KVLayer.keys_transposed)."""

    def prepare(self, meta: AttentionMetadata, kv_layer: KVLayer) -> None:
        """Per-step work shared by every layer; stores the backend's state in meta.backend_state.
        kv_layer: any layer's cache, for its shape."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: KVLayer,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D]: store k/v in their slots, then attend every query over its
        sequence's cached context -> [T, Hq, D]."""
