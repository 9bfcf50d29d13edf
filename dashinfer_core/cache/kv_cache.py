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
                 head_dim: int, dtype: torch.dtype, device: torch.device, num_cpu_blocks: int = 0):
        self.num_blocks = num_blocks
        self.block_size = block_size
        # [layer, K|V, block, head, slot, dim]; blocks are zeroed when first used (zero_blocks).
        self.storage = torch.empty(num_layers, 2, num_blocks, num_kv_heads, block_size, head_dim,
                                   dtype=dtype, device=device)
        # Per layer: [2 (K, V), num_blocks, num_kv_heads, block_size, head_dim].
        self.layers = [self.storage[i] for i in range(num_layers)]
        # The prefix cache's CPU tier: blocks evicted from the device live on here (pinned for fast
        # copies on CUDA). On the CPU device it is simply a second pool.
        self.cpu_storage = torch.empty(num_layers, 2, num_cpu_blocks, num_kv_heads, block_size, head_dim,
                                       dtype=dtype, pin_memory=device.type == "cuda" and num_cpu_blocks > 0)

    def apply(self, ops) -> None:
        """Perform a step's BlockOps: swap out, zero fresh blocks, swap in, copy-on-write."""
        if ops.swap_out:
            src = torch.tensor([p[0] for p in ops.swap_out], device=self.storage.device)
            dst = torch.tensor([p[1] for p in ops.swap_out])
            self.cpu_storage[:, :, dst] = self.storage[:, :, src].to("cpu")
        self.zero_blocks(ops.fresh)
        if ops.swap_in:
            src = torch.tensor([p[0] for p in ops.swap_in])
            dst = torch.tensor([p[1] for p in ops.swap_in], device=self.storage.device)
            self.storage[:, :, dst] = self.cpu_storage[:, :, src].to(self.storage.device, non_blocking=True)
        self.copy_blocks(ops.copies)

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
