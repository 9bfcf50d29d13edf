"""Quantizing KV store: write the step's K and V rows into their cache slots as int8 or uint4, with a
float32 scale and zero point per group of head_dim values (dashinfer_core.quant.kv's layout).

Layouts: k, v [T, Hkv, D] (head_dim contiguous, D a power of two); data caches uint8
[num_blocks, Hkv, block_size, D] (int8) or [..., D / 2] (uint4: value 2j in the low nibble of byte j,
2j + 1 in the high one); scale and zero caches float32 [num_blocks, Hkv, block_size, GROUPS];
slot_mapping [T] int64, -1 = skip. Grid (T, Hkv, 2): one program quantizes one token's head row of K
(axis 2 = 0) or of V (= 1): min/max per group, q = round(x / scale) + zero clamped to the range.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _kv_store_quant_kernel(k_ptr, v_ptr, kq_ptr, vq_ptr, ks_ptr, vs_ptr, kz_ptr, vz_ptr, slot_ptr,
                           stride_kt, stride_kh, stride_vt, stride_vh,
                           NUM_KV_HEADS: tl.constexpr, BLOCK_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr,
                           GROUPS: tl.constexpr, BITS: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    which = tl.program_id(2)
    slot = tl.load(slot_ptr + t)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    row = (block * NUM_KV_HEADS + h) * BLOCK_SIZE + offset
    if which == 0:
        src = k_ptr + t * stride_kt + h * stride_kh
        q_ptr, s_ptr, z_ptr = kq_ptr, ks_ptr, kz_ptr
    else:
        src = v_ptr + t * stride_vt + h * stride_vh
        q_ptr, s_ptr, z_ptr = vq_ptr, vs_ptr, vz_ptr
    GROUP_SIZE: tl.constexpr = HEAD_DIM // GROUPS
    QMAX: tl.constexpr = (1 << BITS) - 1
    x = tl.load(src + tl.reshape(tl.arange(0, HEAD_DIM), [GROUPS, GROUP_SIZE])).to(tl.float32)
    lo = tl.min(x, axis=1)
    hi = tl.max(x, axis=1)
    scale = tl.maximum((hi - lo) / QMAX, 1e-8)
    zero = tl.floor(-lo / scale + 0.5)
    q = tl.floor(x / scale[:, None] + 0.5) + zero[:, None]
    q = tl.minimum(tl.maximum(q, 0.0), QMAX).to(tl.uint8)
    g = tl.arange(0, GROUPS)
    tl.store(s_ptr + row * GROUPS + g, scale)
    tl.store(z_ptr + row * GROUPS + g, zero)
    flat = tl.reshape(q, [HEAD_DIM])
    if BITS == 8:
        tl.store(q_ptr + row * HEAD_DIM + tl.arange(0, HEAD_DIM), flat)
    else:
        even, odd = tl.split(tl.reshape(flat, [HEAD_DIM // 2, 2]))
        tl.store(q_ptr + row * (HEAD_DIM // 2) + tl.arange(0, HEAD_DIM // 2), even | (odd << 4))


def kv_store_quant(k: torch.Tensor, v: torch.Tensor, k_data: torch.Tensor, v_data: torch.Tensor,
                   k_scales: torch.Tensor, v_scales: torch.Tensor, k_zeros: torch.Tensor, v_zeros: torch.Tensor,
                   slot_mapping: torch.Tensor, bits: int) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    assert head_dim == triton.next_power_of_2(head_dim) and k.stride(2) == 1 and v.stride(2) == 1
    _kv_store_quant_kernel[(num_tokens, num_kv_heads, 2)](
        k, v, k_data, v_data, k_scales, v_scales, k_zeros, v_zeros, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), NUM_KV_HEADS=num_kv_heads,
        BLOCK_SIZE=k_data.shape[2], HEAD_DIM=head_dim, GROUPS=k_scales.shape[-1], BITS=bits)


def kv_store_quant_ref(k, v, k_data, v_data, k_scales, v_scales, k_zeros, v_zeros, slot_mapping, bits) -> None:
    from dashinfer_core.quant.kv import quantize_kv
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    block_size = k_data.shape[2]
    blocks, offsets = slots // block_size, slots % block_size
    for x, data, scales, zeros in ((k, k_data, k_scales, k_zeros), (v, v_data, v_scales, v_zeros)):
        q, s, z = quantize_kv(x[keep], bits)
        data[blocks, :, offsets] = q
        scales[blocks, :, offsets] = s
        zeros[blocks, :, offsets] = z
