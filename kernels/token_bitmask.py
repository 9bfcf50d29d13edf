"""Logits masking from a packed token bitmask (guided decoding).

logits [B, V] (modified in place); bitmask [B, ceil(V / 32)] int32, bit (v % 32) of word v // 32
set = token v allowed. Disallowed tokens become -inf. Rows whose index is not in `rows` (or all rows
when rows is None) are masked. Grid (number of masked rows, cdiv(V, BLOCK)).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _bitmask_kernel(logits_ptr, bitmask_ptr, rows_ptr, stride_l, stride_m, VOCAB: tl.constexpr,
                    BLOCK: tl.constexpr, HAS_ROWS: tl.constexpr):
    row = tl.program_id(0)
    if HAS_ROWS:
        row = tl.load(rows_ptr + row)
    v = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    in_vocab = v < VOCAB
    words = tl.load(bitmask_ptr + row * stride_m + v // 32, mask=in_vocab, other=0)
    allowed = ((words >> (v % 32)) & 1) != 0
    ptrs = logits_ptr + row * stride_l + v
    logits = tl.load(ptrs, mask=in_vocab, other=0.0)
    tl.store(ptrs, tl.where(allowed, logits, float("-inf")), mask=in_vocab)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor | None = None,
                        block: int = 2048) -> None:
    batch, vocab = logits.shape
    n = batch if rows is None else rows.numel()
    if n == 0:
        return
    assert logits.stride(1) == 1 and bitmask.stride(1) == 1
    _bitmask_kernel[(n, triton.cdiv(vocab, block))](
        logits, bitmask, rows if rows is not None else bitmask, logits.stride(0), bitmask.stride(0),
        VOCAB=vocab, BLOCK=block, HAS_ROWS=rows is not None)


def apply_token_bitmask_ref(logits, bitmask, rows=None):
    vocab = logits.shape[1]
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, device=bitmask.device, dtype=bitmask.dtype)) & 1
    allowed = bits.flatten(1)[:, :vocab].bool()
    selected = torch.arange(logits.shape[0], device=logits.device) if rows is None else rows.long()
    logits[selected] = logits[selected].masked_fill(~allowed[selected], float("-inf"))
