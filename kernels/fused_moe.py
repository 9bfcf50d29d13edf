"""Fused mixture-of-experts MLP: every (token, top-k slot) pair runs through its expert's gated SiLU
MLP and comes out weighted by its routing weight; the caller sums a token's k rows.

Layouts: x [T, H]; w13 [E, 2I, H] (each expert's gate rows then up rows, as the merged gate/up
Linear holds them); w2 [E, H, I]; topk_ids / topk_weights [T, k]. Output [T, H].

The pairs are first sorted by expert and each expert's run padded to a multiple of BLOCK_M
(`align_by_expert`, plain torch on the device, no host sync: the grid is sized for the worst case and
blocks past the end exit at once), so a program's BLOCK_M rows share one expert's weights:
  kernel 1, grid (blocks, cdiv(I, BLOCK_N)): gate and up tiles of x[rows] @ w13[e]^T, SiLU(gate) * up
            into an [P_pad, I] intermediate in sorted order;
  kernel 2, grid (blocks, cdiv(H, BLOCK_N)): intermediate @ w2[e]^T times the routing weight, stored at
            each pair's own row of an [T * k, H] buffer.
Padding rows (pair id = T * k) load zeros and store nothing; an expert no token chose has no block.
Accumulation in fp32; rounding to the model dtype after SiLU * up and after the down projection.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def align_by_expert(topk_ids: torch.Tensor, num_experts: int, block_m: int):
    """(sorted pair ids [max_padded] padded with P = T * k, the expert of each BLOCK_M block [max_blocks],
    -1 past the last real block). Pair p = token * k + slot."""
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    device = flat.device
    # scatter_add, not bincount: bincount's output size depends on the values (a host sync, which
    # a captured CUDA graph cannot hold).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    experts_sorted = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(num_pairs, device=device) - first_of_expert[experts_sorted]
    dest = (padded_end - padded)[experts_sorted] + rank
    max_padded = num_pairs + num_experts * (block_m - 1)
    max_padded = (max_padded + block_m - 1) // block_m * block_m
    sorted_ids = torch.full((max_padded,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[dest] = order.to(torch.int32)
    block_starts = torch.arange(0, max_padded, block_m, device=device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_starts < padded_end[-1], block_expert, -1).to(torch.int32)
    return sorted_ids, block_expert


@triton.jit
def _block_pairs(sorted_ids_ptr, block_expert_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """This program's block: its expert (-1 past the last real block), its rows of the sorted pairs,
    their pair ids and which of them are real (not padding)."""
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + rows)
    return expert, rows, pairs, pairs < num_pairs


@triton.jit
def _gate_up_kernel(x_ptr, w13_ptr, sorted_ids_ptr, block_expert_ptr, inter_ptr, num_pairs,
                    TOP_K: tl.constexpr, H: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    expert, rows, pairs, valid = _block_pairs(sorted_ids_ptr, block_expert_ptr, num_pairs, BLOCK_M)
    if expert < 0:
        return
    tokens = tl.where(valid, pairs // TOP_K, 0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < INTER
    w_base = w13_ptr + expert.to(tl.int64) * (2 * INTER * H)
    gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < H
        xs = tl.load(x_ptr + tokens[:, None] * H + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        wg = tl.load(w_base + n[None, :] * H + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        wu = tl.load(w_base + (INTER + n[None, :]) * H + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        gate += tl.dot(xs.to(tl.float32), wg.to(tl.float32), input_precision="ieee")
        up += tl.dot(xs.to(tl.float32), wu.to(tl.float32), input_precision="ieee")
    dtype = inter_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
    tl.store(inter_ptr + rows[:, None] * INTER + n[None, :], act.to(dtype), mask=valid[:, None] & n_ok[None, :])


@triton.jit
def _down_kernel(inter_ptr, w2_ptr, sorted_ids_ptr, block_expert_ptr, weights_ptr, out_ptr, num_pairs,
                 H: tl.constexpr, INTER: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr):
    expert, rows, pairs, valid = _block_pairs(sorted_ids_ptr, block_expert_ptr, num_pairs, BLOCK_M)
    if expert < 0:
        return
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < H
    w_base = w2_ptr + expert.to(tl.int64) * (H * INTER)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, INTER, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        k_ok = k < INTER
        a = tl.load(inter_ptr + rows[:, None] * INTER + k[None, :], mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_base + n[None, :] * INTER + k[:, None], mask=n_ok[None, :] & k_ok[:, None], other=0.0)
        acc += tl.dot(a.to(tl.float32), w.to(tl.float32), input_precision="ieee")
    dtype = out_ptr.dtype.element_ty
    weight = tl.load(weights_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
    y = acc.to(dtype).to(tl.float32) * weight[:, None]
    tl.store(out_ptr + pairs[:, None] * H + n[None, :], y.to(dtype), mask=valid[:, None] & n_ok[None, :])


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, block_m: int = 16, block_n: int = 32, block_k: int = 32) -> torch.Tensor:
    num_tokens, hidden = x.shape
    num_experts, double_inter, _ = w13.shape
    inter = double_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    x, w13, w2 = x.contiguous(), w13.contiguous(), w2.contiguous()
    sorted_ids, block_expert = align_by_expert(topk_ids, num_experts, block_m)
    inter_buf = torch.empty(sorted_ids.numel(), inter, dtype=x.dtype, device=x.device)
    per_pair = torch.zeros(num_pairs, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.flatten().contiguous()
    blocks = block_expert.numel()
    _gate_up_kernel[(blocks, triton.cdiv(inter, block_n))](
        x, w13, sorted_ids, block_expert, inter_buf, num_pairs, TOP_K=top_k, H=hidden, INTER=inter,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    _down_kernel[(blocks, triton.cdiv(hidden, block_n))](
        inter_buf, w2, sorted_ids, block_expert, weights, per_pair, num_pairs, H=hidden, INTER=inter,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    return per_pair.view(num_tokens, top_k, hidden).sum(dim=1)


def fused_moe_ref(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """Plain torch: each (token, slot) through its expert, weighted, summed over the slots."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape[0], topk_ids.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
    for t in range(x.shape[0]):
        for slot in range(topk_ids.shape[1]):
            e = int(topk_ids[t, slot])
            h = w13[e].float() @ x[t].float()
            act = torch.nn.functional.silu(h[:inter]) * h[inter:]
            out[t, slot] = (w2[e].float() @ act) * topk_weights[t, slot].float()
    return out.sum(dim=1).to(x.dtype)
