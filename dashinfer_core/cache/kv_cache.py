"""The paged KV cache tensors: per layer, K and V of shape [num_blocks, num_kv_heads, block_size,
head_dim] (head-major blocks; see layers/attention.py), all views of one allocation so that block
copies touch every layer in one op."""
from __future__ import annotations

import torch


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype) -> int:
    element_size = torch.empty((), dtype=dtype).element_size()
    return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # [layer, K|V, block, head, slot, dim]; blocks are zeroed when first used (zero_blocks).
        self.storage = torch.empty(num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim,
                                   dtype=dtype, device=device)
        # Per layer: [2 (K, V), num_blocks, num_kv_heads, block_size, head_dim].
        self.layers = [self.storage[i] for i in range(num_layers)]

    @property
    def nbytes(self) -> int:
        return self.storage.numel() * self.storage.element_size()

    def zero_blocks(self, blocks: list[int]) -> None:
        if blocks:
            self.storage.index_fill_(2, torch.tensor(blocks, device=self.storage.device), 0)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        if not pairs:
            return
        src = torch.tensor([p[0] for p in pairs], device=self.storage.device)
        dst = torch.tensor([p[1] for p in pairs], device=self.storage.device)
        self.storage[:, :, dst] = self.storage[:, :, src]
