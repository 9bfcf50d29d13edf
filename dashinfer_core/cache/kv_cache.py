"""The paged KV cache tensors: per layer, K and V of shape [num_blocks, num_kv_heads, block_size,
head_dim] (head-major blocks; see layers/attention/), all views of one allocation so that block
copies touch every layer in one op."""
from __future__ import annotations

from dataclasses import dataclass

import torch


def bytes_per_block(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, kv_bits: int | None = None) -> int:
    if kv_bits is None:
        element_size = torch.empty((), dtype=dtype).element_size()
        return 2 * num_layers * block_size * num_kv_heads * head_dim * element_size
    from ..quant.kv import kv_groups
    data = head_dim * kv_bits // 8
    # + an fp32 scale and zero point per group of each token's head vector
    return 2 * num_layers * block_size * num_kv_heads * (data + 8 * kv_groups(kv_bits, head_dim))


@dataclass
class KVLayer:
    """One layer's cache. data: [2 (K, V), blocks, kv heads, block_size, head_dim] in the model dtype,
    or uint8 with head_dim (int8) or head_dim / 2 (uint4) when quantized; then scales and zeros
    [2, blocks, kv heads, block_size, groups] hold the fp32 scale and zero point of each group.
    keys_transposed: each (block, head) chunk of K holds its keys as [head_dim, block_size] (the attention
    backend's choice, TorchAttention.keys_transposed); V and quantized caches always [block_size, head_dim]."""
    data: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    bits: int | None = None
    head_dim: int = 0
    keys_transposed: bool = False

    @property
    def shape(self):  # [2, blocks, kv heads, block_size, head_dim] as if unquantized
        return (*self.data.shape[:4], self.head_dim)


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device, num_cpu_blocks: int = 0,
                 kv_bits: int | None = None, keys_transposed: bool = False):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.kv_bits = kv_bits
        width = head_dim if kv_bits in (None, 8) else head_dim // 2
        store_dtype = dtype if kv_bits is None else torch.uint8
        from ..quant.kv import kv_groups
        groups = kv_groups(kv_bits, head_dim) if kv_bits else 1

        def pools(blocks: int, cpu: bool):
            place = dict(device="cpu", pin_memory=device.type == "cuda" and blocks > 0) if cpu else dict(device=device)
            # [layer, K|V, block, head, slot, dim]; blocks are zeroed when first used (zero_blocks).
            data = torch.empty(num_layers, 2, blocks, num_kv_heads, block_size, width, dtype=store_dtype, **place)
            if kv_bits is None:
                return [data]
            return [data] + [torch.empty(num_layers, 2, blocks, num_kv_heads, block_size, groups, **place)
                             for _ in range(2)]

        self.pools = pools(num_blocks, cpu=False)  # data (+ scales, zeros)
        self.storage = self.pools[0]
        self.layers = [KVLayer(self.pools[0][i], *(p[i] for p in self.pools[1:]), bits=kv_bits, head_dim=head_dim)
                       if kv_bits else KVLayer(self.pools[0][i], head_dim=head_dim, keys_transposed=keys_transposed)
                       for i in range(num_layers)]
        # The prefix cache's CPU tier: blocks evicted from the device live on here (pinned for fast
        # copies on CUDA). On the CPU device it is simply a second pool.
        self.cpu_pools = pools(num_cpu_blocks, cpu=True)
        self.cpu_storage = self.cpu_pools[0]

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.pools)

    def apply(self, ops) -> None:
        """Perform a step's BlockOps on every pool (data, and scales and zeros when quantized):
        swap out, zero fresh blocks, swap in, copy-on-write."""
        if ops.swap_out:
            for pool, cpu in zip(self.pools, self.cpu_pools):
                _copy_blocks(cpu, [p[1] for p in ops.swap_out], pool, [p[0] for p in ops.swap_out])
        self.zero_blocks(ops.fresh)
        if ops.swap_in:
            for pool, cpu in zip(self.pools, self.cpu_pools):
                _copy_blocks(pool, [p[1] for p in ops.swap_in], cpu, [p[0] for p in ops.swap_in])
        self.copy_blocks(ops.copies)

    def zero_blocks(self, blocks: list[int]) -> None:
        """Zero blocks used for the first time, in every pool. On the CPU block by block: index_fill_ along the
        block dimension took ~3.6x as long (4 blocks of the embedded model's fp32 cache: 210 against 58 us)."""
        if not blocks:
            return
        if self.storage.device.type == "cpu":
            for pool in self.pools:
                for block in blocks:
                    pool[:, :, block].zero_()
            return
        index = torch.tensor(blocks, device=self.storage.device)
        for pool in self.pools:
            pool.index_fill_(2, index, 0)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copy whole blocks src -> dst in every layer (copy-on-write of shared blocks)."""
        if pairs:
            for pool in self.pools:
                _copy_blocks(pool, [p[1] for p in pairs], pool, [p[0] for p in pairs])


def _copy_blocks(dst: torch.Tensor, dst_blocks: list[int], src: torch.Tensor, src_blocks: list[int]) -> None:
    """dst[:, :, dst_blocks[i]] = src[:, :, src_blocks[i]] for every layer, K and V. Host to host, block by
    block: each copy is a few contiguous runs, where an indexed gather and scatter writes the whole selection
    to a temporary first (4.5x slower for 100 blocks of the embedded model). Otherwise one indexed copy (a
    CUDA launch per block would cost more)."""
    if dst.device.type == "cpu" and src.device.type == "cpu":
        for d, s in zip(dst_blocks, src_blocks):
            dst[:, :, d].copy_(src[:, :, s])
        return
    src_index = torch.tensor(src_blocks, device=src.device)
    dst_index = torch.tensor(dst_blocks, device=dst.device)
    dst[:, :, dst_index] = src[:, :, src_index].to(dst.device, non_blocking=True)
