"""Attention over the paged KV cache, behind one backend interface.

Cache layout (per layer, K and V alike): [num_blocks, num_kv_heads, block_size, head_dim]. Head-major
blocks keep one head's keys of a block contiguous, so a gather of (block, head) chunks yields
[seqs, heads, context, head_dim] ready for batched matmul with no transpose, and a GPU kernel loads a
head's block tile as one contiguous run. Each backend first writes the step's K/V into the cache
slots of `slot_mapping`, then attends every query over its sequence's whole context (cached prefix +
new tokens) through `block_tables`. A backend may ask for K transposed within each (block, head) chunk
([head_dim, block_size]; KVLayer.keys_transposed): the torch backend does for 16-bit caches on its
compiled CPU path, where a key's score is then a sum over vectors that run across keys.

  metadata.py        AttentionMetadata: the step's batch as attention sees it
  backend.py         the AttentionBackend protocol and its capability flags
  torch_backend.py   TorchAttention: the CPU path and the reference
  triton_backend.py  TritonAttention: the dashinfer_kernels Triton kernels (CUDA)
"""
from __future__ import annotations

import os

import torch

from .backend import AttentionBackend
from .metadata import AttentionMetadata
from .torch_backend import TorchAttention

__all__ = ["AttentionBackend", "AttentionMetadata", "TorchAttention", "make_attention_backend"]


def make_attention_backend(name: str, device: torch.device, fused: bool = True) -> AttentionBackend:
    """'auto' = Triton on CUDA, torch elsewhere; 'triton' on the CPU needs TRITON_INTERPRET=1.
    fused: the torch backend may use the compiled decode attention (a capability choice)."""
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttention(fused=fused)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        from ...errors import InvalidParameterError
        raise InvalidParameterError("attention_backend", "'triton' needs a CUDA device (or TRITON_INTERPRET=1)")
    from .triton_backend import TritonAttention
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return TritonAttention(num_sms)
