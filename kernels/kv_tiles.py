"""A shared Triton helper: load one cache block's K or V tile of one KV head, dequantizing int8 /
uint4 caches in registers (see kv_store_quant.py for their layout)."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def load_kv_tile(data_ptr, scale_ptr, zero_ptr, block, kv_head, NUM_KV_HEADS: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, KV_BITS: tl.constexpr,
                 GROUPS: tl.constexpr):
    """[BLOCK_SIZE, BLOCK_D]: the cache dtype when KV_BITS == 0, else float32 values (q - zero) * scale."""
    n = tl.arange(0, BLOCK_SIZE)
    d = tl.arange(0, BLOCK_D)
    rows = (block * NUM_KV_HEADS + kv_head) * BLOCK_SIZE + n
    if KV_BITS == 0:
        return tl.load(data_ptr + rows[:, None] * HEAD_DIM + d[None, :], mask=(d < HEAD_DIM)[None, :], other=0.0)
    else:
        if KV_BITS == 8:
            q = tl.load(data_ptr + rows[:, None] * HEAD_DIM + d[None, :]).to(tl.float32)
        else:
            half = tl.arange(0, HEAD_DIM // 2)
            packed = tl.load(data_ptr + rows[:, None] * (HEAD_DIM // 2) + half[None, :])
            q = tl.reshape(tl.join(packed & 0x0F, packed >> 4), [BLOCK_SIZE, HEAD_DIM]).to(tl.float32)
        group = d // (HEAD_DIM // GROUPS)
        scale = tl.load(scale_ptr + rows[:, None] * GROUPS + group[None, :])
        zero = tl.load(zero_ptr + rows[:, None] * GROUPS + group[None, :])
        return (q - zero) * scale
