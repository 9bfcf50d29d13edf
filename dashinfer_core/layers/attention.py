"""Attention over the paged KV cache, behind one backend interface.

Cache layout (per layer, K and V alike): [num_blocks, num_kv_heads, block_size, head_dim]. Head-major
blocks keep one head's keys of a block contiguous, so a gather of (block, head) chunks yields
[seqs, heads, context, head_dim] ready for batched matmul with no transpose, and a GPU kernel loads a
head's block tile as one contiguous run.
A step's batch is one varlen batch: sequences [0, num_decodes) contribute one query token each,
the rest contribute prefill chunks. Each backend first writes the step's K/V into the cache slots of
`slot_mapping`, then attends every query over its sequence's whole context (cached prefix + new
tokens) through `block_tables`.

`TorchAttention` is the CPU path and the reference; the Triton backend (dashinfer_kernels) plugs in
on CUDA through the same two methods.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..cache.kv_cache import KVLayer
from ..quant.kv import dequantize_kv, quantize_kv

log = logging.getLogger(__name__)


def gathered_decode_attention(q: torch.Tensor, kv: torch.Tensor, chunks: torch.Tensor, bias: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """Single-query attention straight from the paged cache, written as elementwise products and
    sums so that torch.compile fuses the gather into the reductions: the cache is read once, where
    index_select + matmul writes a padded copy and reads it again (2.3x slower per layer on the dev
    machine, fp32, 64 sequences of ~460 tokens).
    q: [n, Hkv, group, D]; kv: [2, blocks * Hkv, block_size, D]; chunks: [n, Hkv, nblk] (block, head)
    ids; bias: [n, L] (0 or -inf, L = nblk * block_size) -> [n, Hkv, group, D]. Accumulates in fp32."""
    n, num_kv_heads, nblk = chunks.shape
    length, head_dim = nblk * kv.shape[2], q.shape[-1]
    keys = kv[0][chunks].view(n, num_kv_heads, 1, length, head_dim).float()
    values = kv[1][chunks].view(n, num_kv_heads, 1, length, head_dim).float()
    scores = (q.float()[:, :, :, None, :] * keys).sum(-1) * scale + bias.float()[:, None, None, :]
    probs = torch.softmax(scores, dim=-1)
    return (probs[..., None] * values).sum(-2).to(q.dtype)


# The compiled form of gathered_decode_attention, shared by every engine in the process; None once
# compiling has failed (no C++ compiler), and the index_select + matmul path takes over.
_compiled_decode = torch.compile(gathered_decode_attention, dynamic=False)
# Variants compiled so far. Past dynamo's recompile limit it would run the function eagerly, which
# materializes [n, heads, group, L, D] products: new variants take the matmul path instead.
_compiled_variants: set[tuple] = set()
MAX_COMPILED_VARIANTS = 6


def fused_decode(q, kv, chunks, bias, scale) -> torch.Tensor | None:
    """Batch, context and pool sizes are marked dynamic (one compile per dtype and head shape, not
    per batch); head counts and head_dim stay static so the inner loops vectorize. Sizes 1 are
    specialized by dynamo, hence their place in the variant key. None = use the matmul path."""
    global _compiled_decode
    variant = (q.dtype, kv.dtype, q.shape[1:], kv.shape[2:], q.shape[0] == 1, chunks.shape[2] == 1, float(scale))
    if _compiled_decode is None or (variant not in _compiled_variants
                                    and len(_compiled_variants) >= MAX_COMPILED_VARIANTS):
        return None
    _compiled_variants.add(variant)
    for tensor, dims in ((q, (0,)), (kv, (1,)), (chunks, (0, 2)), (bias, (0, 1))):
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)
    try:
        return _compiled_decode(q, kv, chunks, bias, scale)
    except Exception as exc:  # an inductor failure: the eager path gives the same result
        log.warning("compiled decode attention unavailable (%s); using index_select + matmul", exc)
        _compiled_decode = None
        return None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64; -1 = padding, not stored
    query_start_loc: torch.Tensor  # [B + 1] int32 on the device
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    num_seqs: int
    num_decodes: int  # sequences [0, num_decodes) have exactly one query token
    max_seq_len: int
    max_query_len: int
    # Host copies, for loops over the (few) prefill sequences.
    query_start_loc_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    # Per-step work a backend shares across layers (e.g. gathered block indices, masks).
    backend_state: dict = field(default_factory=dict)


class TorchAttention:
    """Plain-torch paged attention.

    Decode rows are grouped into buckets of similar context length, so padding to the longest
    context in a bucket wastes little. Per bucket, one index_select gathers K and V of every
    (block, head) chunk into a workspace laid out [2, seqs, heads, context, head_dim]; the
    workspace is reused across layers and steps (fresh multi-MB tensors per layer cost more in page
    faults than the copy itself). Prefill chunks attend with SDPA, one sequence at a time.
    """

    name = "torch"
    MAX_BUCKETS = 4
    BUCKET_GROWTH = 1.3  # start a new bucket when a context is this much longer than the bucket's first
    SHORT_CHUNK = 8  # prefill chunks up to this many tokens go through the batched decode path

    def __init__(self, fused: bool = True):
        self._workspace: torch.Tensor | None = None
        self.fused = fused  # compiled gathered_decode_attention for unquantized CPU caches

    def prepare(self, meta: AttentionMetadata, kv_cache: torch.Tensor) -> None:
        """Per-step precomputation shared by all layers (kv_cache: any layer's, for its shape)."""
        state = meta.backend_state
        _, _, num_kv_heads, block_size, _ = kv_cache.shape
        state["buckets"] = self._decode_buckets(meta, num_kv_heads, block_size)
        slots = meta.slot_mapping
        valid = slots >= 0
        state["token_idx"] = None if bool(valid.all()) else valid.nonzero().squeeze(1)
        if state["token_idx"] is not None:
            slots = slots[state["token_idx"]]
        # Row of each (token, head) in the cache viewed as [blocks * heads * block_size, head_dim].
        heads = torch.arange(num_kv_heads, device=slots.device)
        blocks, offsets = slots // block_size, slots % block_size
        state["store_rows"] = ((blocks[:, None] * num_kv_heads + heads[None, :]) * block_size
                               + offsets[:, None]).reshape(-1)

    def _single_queries(self, meta: AttentionMetadata) -> tuple[list[int], list[int], list[int]]:
        """(token index, block-table row, context length) of every query answered on the batched
        path: each decode, and each token of a short prefill chunk (guided jump-forward, the tail of
        a chunked prompt) as if it were a decode at its own position."""
        tokens, rows, lens = list(range(meta.num_decodes)), list(range(meta.num_decodes)), \
            list(meta.seq_lens_host[:meta.num_decodes])
        starts = meta.query_start_loc_host
        for i in range(meta.num_decodes, meta.num_seqs):
            num_new = starts[i + 1] - starts[i]
            if num_new <= self.SHORT_CHUNK:
                first_pos = meta.seq_lens_host[i] - num_new
                tokens += range(starts[i], starts[i + 1])
                rows += [i] * num_new
                lens += range(first_pos + 1, first_pos + num_new + 1)
        return tokens, rows, lens

    def _decode_buckets(self, meta: AttentionMetadata, num_kv_heads: int, block_size: int):
        tokens, table_rows, lens = self._single_queries(meta)
        if not tokens:
            return []
        order = sorted(range(len(tokens)), key=lens.__getitem__)
        groups, current = [], [order[0]]
        for i in order[1:]:
            if lens[i] > self.BUCKET_GROWTH * lens[current[0]] and len(groups) < self.MAX_BUCKETS - 1:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        device = meta.seq_lens.device
        heads = torch.arange(num_kv_heads, device=device)
        buckets = []
        for group in groups:
            num_blocks = -(-max(lens[i] for i in group) // block_size)
            token_idx = torch.tensor([tokens[i] for i in group], device=device)
            blocks = meta.block_tables[torch.tensor([table_rows[i] for i in group], device=device), :num_blocks].long()
            # (block, head) chunk ids in [query, head, block] order.
            chunks = blocks[:, None, :] * num_kv_heads + heads[None, :, None]
            positions = torch.arange(num_blocks * block_size, device=device)
            outside = positions[None, :] >= torch.tensor([lens[i] for i in group], device=device)[:, None]
            bias = torch.zeros(outside.shape, device=device).masked_fill_(outside, float("-inf"))
            buckets.append((token_idx, chunks, bias))
        return buckets

    def _gather(self, kv_cache: KVLayer, chunks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[2, num_chunks, block_size, head_dim] of the listed (block, head) chunks of K and V
        (dequantized into the workspace when the cache is quantized)."""
        _, num_blocks, num_kv_heads, block_size, head_dim = kv_cache.shape
        shape = (2, chunks.numel(), block_size, head_dim)
        numel = 2 * chunks.numel() * block_size * head_dim
        ws = self._workspace
        device = kv_cache.data.device
        if ws is None or ws.dtype != dtype or ws.device != device or ws.numel() < numel:
            ws = self._workspace = torch.empty(numel, dtype=dtype, device=device)
        out = ws[:numel].view(shape)
        data = kv_cache.data.view(2, num_blocks * num_kv_heads, block_size, -1)
        if kv_cache.bits is None:
            torch.index_select(data, 1, chunks, out=out)
        else:
            def gather(pool):
                return pool.view(2, num_blocks * num_kv_heads, block_size, -1).index_select(1, chunks)
            dequantize_kv(data.index_select(1, chunks), gather(kv_cache.scales), gather(kv_cache.zeros),
                          kv_cache.bits, out=out)
        return out

    @staticmethod
    def _blocks(kv_cache: KVLayer, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[2, len(blocks), Hkv, block_size, D] of whole blocks (dequantized when quantized)."""
        if kv_cache.bits is None:
            return kv_cache.data[:, blocks]
        return dequantize_kv(kv_cache.data[:, blocks], kv_cache.scales[:, blocks], kv_cache.zeros[:, blocks],
                             kv_cache.bits, dtype)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: KVLayer,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D], kv_cache: one layer's KVLayer -> [T, Hq, D]."""
        store_kv(k, v, kv_cache, meta)
        out = torch.empty_like(q)
        out[meta.query_start_loc_host[-1]:].zero_()  # padding tokens (runner's shape buckets) belong to no sequence
        num_kv_heads, head_dim = k.shape[1], k.shape[2]
        group = q.shape[1] // num_kv_heads
        fused = self.fused and kv_cache.bits is None and q.device.type == "cpu"
        for rows, chunks, bias in meta.backend_state["buckets"]:
            n, length = bias.shape
            # The query heads of one KV head attend together: [n, Hkv, group, D] x [n, Hkv, D, L].
            queries = q.index_select(0, rows).view(n, num_kv_heads, group, head_dim)
            o = None
            if fused:
                kv = kv_cache.data.view(2, -1, kv_cache.shape[3], head_dim)
                o = fused_decode(queries, kv, chunks, bias, scale)
            if o is None:
                kv = self._gather(kv_cache, chunks.reshape(-1), q.dtype)
                keys = kv[0].view(n, num_kv_heads, length, head_dim)
                values = kv[1].view(n, num_kv_heads, length, head_dim)
                scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale).add_(bias[:, None, None, :])
                o = torch.matmul(torch.softmax(scores, dim=-1), values)
            out.index_copy_(0, rows, o.view(n, -1, head_dim))
        block_size = kv_cache.shape[3]
        starts, lens = meta.query_start_loc_host, meta.seq_lens_host
        for i in range(meta.num_decodes, meta.num_seqs):
            start, end, ctx_len = starts[i], starts[i + 1], lens[i]
            num_new = end - start
            if num_new <= self.SHORT_CHUNK:
                continue  # answered with the decodes above
            qi = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            # No cached prefix: attend to this chunk's own K/V, unless the cache is quantized: then
            # always read it back, so results do not depend on chunking or prefix-cache hits (and
            # match the Triton kernels, which always read the cache).
            if ctx_len == num_new and kv_cache.bits is None:
                ki, vi = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
                mask, causal = None, True
            else:
                blocks = meta.block_tables[i, : -(-ctx_len // block_size)].long()
                kv = self._blocks(kv_cache, blocks, q.dtype).transpose(2, 3).flatten(1, 2)[:, :ctx_len]
                ki, vi = kv[0].transpose(0, 1), kv[1].transpose(0, 1)
                if 2 * num_new > ctx_len:
                    # A large chunk: pad the queries in front to a square and use the causal flash
                    # path, which skips masked tiles (an explicit mask computes every one).
                    pad = qi.new_zeros(1, qi.shape[1], ctx_len - num_new, qi.shape[3])
                    qi = torch.cat((pad, qi), dim=2)
                    mask, causal = None, True
                else:
                    # Query j sits at position ctx_len - num_new + j and sees keys up to there.
                    q_pos = torch.arange(ctx_len - num_new, ctx_len, device=q.device)
                    mask = torch.arange(ctx_len, device=q.device)[None, :] <= q_pos[:, None]
                    causal = False
            oi = F.scaled_dot_product_attention(qi, ki.unsqueeze(0), vi.unsqueeze(0), attn_mask=mask,
                                                is_causal=causal, scale=scale, enable_gqa=True)
            out[start:end] = oi[0, :, -num_new:].transpose(0, 1)
        return out


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: KVLayer, meta: AttentionMetadata) -> None:
    """Write the step's K/V rows into their slots (slot -1 = padding, skipped), quantizing them
    when the cache is quantized."""
    state = meta.backend_state
    if state["token_idx"] is not None:
        k, v = k[state["token_idx"]], v[state["token_idx"]]
    rows = state["store_rows"]
    head_dim = k.shape[-1]
    data = kv_cache.data
    for i, x in enumerate((k, v)):
        if kv_cache.bits is None:
            data[i].view(-1, head_dim).index_copy_(0, rows, x.reshape(-1, head_dim))
        else:
            qx, sx, zx = quantize_kv(x.reshape(-1, head_dim), kv_cache.bits)
            data[i].view(-1, qx.shape[-1]).index_copy_(0, rows, qx)
            kv_cache.scales[i].view(-1, sx.shape[-1]).index_copy_(0, rows, sx)
            kv_cache.zeros[i].view(-1, zx.shape[-1]).index_copy_(0, rows, zx)


class TritonAttention:
    """Triton kernels (dashinfer_kernels): KV store, split-KV paged decode, varlen paged prefill.
    Nothing here reads device values on the host, so a decode step can be captured in a CUDA graph.
    On the CPU it runs only under TRITON_INTERPRET=1 (tests)."""

    name = "triton"

    def __init__(self, num_sms: int = 132):
        from dashinfer_kernels import kv_store, kv_store_quant, paged_decode_attention, paged_prefill_attention
        self._kv_store = kv_store.kv_store
        self._kv_store_quant = kv_store_quant.kv_store_quant
        self._decode = paged_decode_attention.paged_decode_attention
        self._choose_splits = paged_decode_attention.choose_num_splits
        self._prefill = paged_prefill_attention.paged_prefill_attention
        self.num_sms = num_sms

    def prepare(self, meta: AttentionMetadata, kv_cache: torch.Tensor) -> None:
        num_kv_heads = kv_cache.shape[2]  # KVLayer.shape: [2, blocks, kv heads, block_size, head_dim]
        meta.backend_state["num_splits"] = self._choose_splits(
            meta.num_decodes, num_kv_heads, meta.block_tables.shape[1], self.num_sms) if meta.num_decodes else 1

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        k_cache, v_cache = kv_cache.data[0], kv_cache.data[1]
        quant = None
        if kv_cache.bits:
            quant = (kv_cache.bits, kv_cache.scales[0], kv_cache.scales[1], kv_cache.zeros[0], kv_cache.zeros[1])
            self._kv_store_quant(k, v, k_cache, v_cache, quant[1], quant[2], quant[3], quant[4], meta.slot_mapping,
                                 kv_cache.bits)
        else:
            self._kv_store(k, v, k_cache, v_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        nd = meta.num_decodes
        if nd:
            self._decode(q[:nd], k_cache, v_cache, meta.block_tables[:nd], meta.seq_lens[:nd], scale,
                         num_splits=meta.backend_state["num_splits"], out=out[:nd], kv_quant=quant)
        if meta.num_seqs > nd:
            block_m = 64 if q.is_cuda else 16
            self._prefill(q, k_cache, v_cache, meta.block_tables[nd:], meta.seq_lens[nd:],
                          meta.query_start_loc[nd:], meta.max_query_len, scale, out=out, block_m=block_m,
                          kv_quant=quant)
        return out


def make_attention_backend(name: str, device: torch.device, fused: bool = True):
    """'auto' = Triton on CUDA, torch elsewhere; 'triton' on the CPU needs TRITON_INTERPRET=1.
    fused: the torch backend may use the compiled decode attention (a capability choice)."""
    import os
    if name == "auto":
        name = "triton" if device.type == "cuda" else "torch"
    if name == "torch":
        return TorchAttention(fused=fused)
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        from ..errors import InvalidParameterError
        raise InvalidParameterError("attention_backend", "'triton' needs a CUDA device (or TRITON_INTERPRET=1)")
    num_sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    return TritonAttention(num_sms)
