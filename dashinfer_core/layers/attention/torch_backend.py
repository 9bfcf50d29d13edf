"""TorchAttention: plain-torch paged attention, the CPU path and the reference for the Triton kernels.

Decode queries (and the tokens of short prefill chunks) are answered together: rows are grouped into
buckets of similar context length, and each bucket reads its blocks from the cache, either inside a
compiled reduction (gathered_decode_attention) or by index_select + matmul of their (block, head) chunks. Longer
prefill chunks attend with SDPA, one sequence at a time.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ...cache.kv_cache import KVLayer
from ...capabilities import native_bf16
from ...compiling import compile_or_eager
from ...quant.kv import dequantize_kv, quantize_kv
from .metadata import AttentionMetadata


def gathered_decode_attention(q: torch.Tensor, kv: torch.Tensor, blocks: torch.Tensor, bias: torch.Tensor,
                              scale: float, keys_transposed: bool = False) -> torch.Tensor:
    """Single-query attention straight from the paged cache, written as elementwise products and
    sums so that torch.compile fuses the gather into the reductions: the cache is read once, where
    index_select + matmul writes a padded copy and reads it again (2.3x slower per layer on the dev
    machine, fp32, 64 sequences of ~460 tokens).
    q: [n, Hkv, group, D]; kv: a layer's cache [2, blocks, Hkv, block_size, D]; blocks: [n, nblk] block ids;
    bias: [n, L] (0 or -inf, L = nblk * block_size) -> [n, Hkv, group, D]. Accumulates in fp32.
    keys_transposed: each K chunk holds [D, block_size] (KVLayer.keys_transposed)."""
    n, nblk = blocks.shape
    group = q.shape[2]
    num_kv_heads, block, head_dim = kv.shape[2:]
    # Indexed by block, every head of a block together: the loops then follow the cache, whose blocks hold
    # their heads side by side (the head outermost, each (block, head) chunk was read on its own, 4 KB, and the
    # next block's chunk 12 KB on). bf16, 64 sequences of 300-500 tokens, 2-core AMD EPYC, caches swept out
    # before each call, median ms per layer, old/new in alternating processes: each sequence's blocks side by side
    # 2.91/2.94 -> 1.68/1.67, blocks taken in turns as decodes grow 3.20/2.38 -> 2.79/2.64, shuffled 3.37/3.15 ->
    # 2.57/2.53. fp32: the same sums in the same order (bit-equal), time within the noise.
    query = q.float()
    values = kv[1][blocks].float()  # [n, nblk, Hkv, block, D]
    # Each query head's sum written on its own where K is transposed (see TRANSPOSED_K_DTYPES).
    unrolled = keys_transposed and group <= MAX_UNROLLED_GROUP
    if keys_transposed:
        keys = kv[0].view(kv.shape[1], num_kv_heads, head_dim, block)[blocks].float()  # [n, nblk, Hkv, D, block]
        if unrolled:
            scores = torch.stack([(query[:, None, :, g, :, None] * keys).sum(-2) for g in range(group)], dim=3)
        else:
            scores = (query[:, None, :, :, :, None] * keys[:, :, :, None]).sum(-2)
    else:
        keys = kv[0][blocks].float()  # [n, nblk, Hkv, block, D]
        scores = (query[:, None, :, :, None, :] * keys[:, :, :, None]).sum(-1)
    # scores: [n, nblk, Hkv, group, block]
    scores = scores * scale + bias.float().view(n, nblk, 1, 1, block)
    # Softmax with its division after the sum over values: inside the values loop inductor would divide
    # each weight again for every 16-wide slice of head_dim and every query head of the group
    # (64 sequences of 300-500 tokens, fp32: 4.6 -> 3.2 ms per layer on the dev machine).
    weights = torch.exp(scores - scores.amax(dim=(1, 4), keepdim=True))
    # Reduced per (block, head) chunk first, then across blocks: inductor then looks up a chunk's address
    # once per chunk instead of once per key (bf16, 64 sequences of 300-500 tokens: 2.9 -> 2.4 ms per
    # layer on the dev machine; fp32 2.4 -> 1.9).
    if unrolled:
        per_block = torch.stack([(weights[:, :, :, g, :, None] * values).sum(-2) for g in range(group)], dim=3)
    else:
        per_block = (weights[..., None] * values[:, :, :, None]).sum(-2)  # [n, nblk, Hkv, group, D]
    return (per_block.sum(1) / weights.sum(dim=(1, 4))[..., None]).to(q.dtype)


# 16-bit caches keep K transposed per (block, head) chunk ([D, block_size]): the score of a key is then a sum over
# D of vectors that run across keys, one multiply-add per element, where with [block_size, D] chunks every key's
# score ends in a horizontal sum across vector lanes (three per key with a GQA group of three, about half of that
# loop's instructions). And each query head's sum is written on its own so that the sums share one loop: a K or V
# row is loaded and converted to fp32 once for every head of the group (with the group as a tensor dimension
# inductor loops over it outside the keys). bf16, 64 sequences of 300-500 tokens, 2-core AMD EPYC (avx512_bf16),
# the layouts alternating 60 times in one process: median 2.85 -> 2.23 ms per layer (min 2.55 -> 1.80). fp32
# keeps [block_size, D]: nothing to convert, and no gain there (median 3.29 against 3.60 unrolled, 3.40 with
# the group as a dimension).
TRANSPOSED_K_DTYPES = (torch.bfloat16, torch.float16)
MAX_UNROLLED_GROUP = 8  # measured at 3 only; 8 heads already hold 16 accumulator registers, wider groups keep the
# group as a dimension


def _matmul_path(*args) -> None:
    return None  # the caller gathers and uses index_select + matmul instead


# Inductor compiles its C++ with -ffp-contract=off by default: a multiply and an add per element of the score and
# value sums. Contracted to fused multiply-adds (rounded once instead of twice), 64 sequences of 300-500 tokens,
# 2-core AMD EPYC, the two alternating in one process: bf16 2.93 -> 2.63 ms median per layer, fp32 3.00 -> 2.83.
FUSED_MULTIPLY_ADD = {"cpp.enable_floating_point_contract_flag": "fast"}
# The compiled form of gathered_decode_attention, shared by every engine in the process; after a
# compile failure (no C++ compiler) it answers None and the index_select + matmul path takes over.
compiled_decode = compile_or_eager(gathered_decode_attention, name="compiled decode attention",
                                   fallback=_matmul_path, dynamic=False, options=FUSED_MULTIPLY_ADD)
# Variants compiled so far. Past dynamo's recompile limit it would run the function eagerly, which
# materializes [n, heads, group, L, D] products: new variants take the matmul path instead.
_compiled_variants: set[tuple] = set()
MAX_COMPILED_VARIANTS = 6


def mark_dynamic(*dims_of: tuple[torch.Tensor, tuple[int, ...]]) -> None:
    """(tensor, dims): sizes that vary between calls of a graph compiled with dynamic=False."""
    for tensor, dims in dims_of:
        for dim in dims:
            torch._dynamo.maybe_mark_dynamic(tensor, dim)


def fused_decode(q, kv, blocks, bias, scale, keys_transposed: bool = False) -> torch.Tensor | None:
    """Batch, context and pool sizes are marked dynamic (one compile per dtype and head shape, not
    per batch); head counts and head_dim stay static so the inner loops vectorize. Sizes 1 are
    specialized by dynamo, hence their place in the variant key. None = use the matmul path."""
    variant = (q.dtype, kv.dtype, q.shape[1:], kv.shape[2:], q.shape[0] == 1, blocks.shape[1] == 1, float(scale),
               keys_transposed)
    if not compiled_decode.active or (variant not in _compiled_variants
                                      and len(_compiled_variants) >= MAX_COMPILED_VARIANTS):
        return None
    _compiled_variants.add(variant)
    # The queries go in as fp32: converted inside, a bf16 query row is converted again for every key it
    # meets (bf16, 64 sequences of 300-500 tokens: 3.45 -> 3.09 ms per layer, the same output).
    query = q.float()
    mark_dynamic((query, (0,)), (kv, (1,)), (blocks, (0, 1)), (bias, (0, 1)))
    out = compiled_decode(query, kv, blocks, bias, scale, keys_transposed)
    return out if out is None else out.to(q.dtype)


@dataclass
class DecodeBucket:
    """Queries answered together over contexts of similar length."""
    token_idx: torch.Tensor | None  # [n]: the queries' rows in the step's tokens (None: rows 0..n-1)
    blocks: torch.Tensor  # [n, nblk]: the block ids of each query's context
    bias: torch.Tensor  # [n, nblk * block_size]: 0 inside the context, -inf past it
    chunks: torch.Tensor | None = None  # the matmul path's (block, head) ids, made at its first layer of the step


@dataclass
class TorchStepState:
    buckets: list[DecodeBucket]  # decodes and the tokens of short prefill chunks
    long_prefills: list[int]  # sequences whose chunk attends with SDPA
    token_idx: torch.Tensor | None  # tokens to store (None: all; padding tokens are skipped)
    store_rows: torch.Tensor  # row of each stored (token, head) in the cache viewed as [-1, head_dim]
    # A cache with K transposed: each stored (token, head)'s (block, head) chunk and offset in it, where K goes
    key_store: tuple[torch.Tensor, torch.Tensor] | None = None


class TorchAttention:
    """Decode rows are grouped into buckets of similar context length, so padding to the longest
    context in a bucket wastes little. Per bucket, one index_select gathers K and V of every
    (block, head) chunk into a workspace laid out [2, seqs, heads, context, head_dim]; the
    workspace is reused across layers and steps (fresh multi-MB tensors per layer cost more in page
    faults than the copy itself). Prefill chunks attend with SDPA, one sequence at a time.
    """

    name = "torch"
    supports_cuda_graphs = False  # prepare() reads the step's lengths on the host
    native_on_cpu = True
    MAX_BUCKETS = 4
    BUCKET_GROWTH = 1.3  # start a new bucket when the bucket's first (longest) context is this much longer
    # The compiled path takes one bucket while its padded keys are at most this many times the real ones: past a
    # sequence's blocks its table row lists block 0 (runner._plan), so the padding re-reads one block from the
    # caches instead of memory; and a one-bucket decode step runs its attention inside the layer graphs (4 buckets
    # took 120 compiled calls a step, each ~50 us of dynamo and wrapper under the profiler). bf16, 64 sequences,
    # each one's blocks side by side, caches swept, median ms per layer, 4 buckets / 1: contexts 72-552 (1 bucket
    # 1.6x the real keys) 2.17 / 1.69, 33-513 (1.67x) 1.41 / 1.40, 32-1024 (1.77x) 3.77 / 3.24, 16-2000 (1.80x)
    # 6.59 / 7.88; fp32 72-552 4.23 / 4.02, 33-513 4.83 / 4.21.
    MAX_PADDING = 1.75
    SHORT_CHUNK = 8  # prefill chunks up to this many tokens go through the batched decode path

    def __init__(self, fused: bool = True):
        self._workspace: torch.Tensor | None = None
        self.fused = fused  # compiled gathered_decode_attention for unquantized CPU caches

    def _fused_for(self, kv_layer: KVLayer, device: torch.device) -> bool:
        """The compiled gathered_decode_attention answers this cache's decodes (unquantized, on the CPU)."""
        return self.fused and kv_layer.bits is None and device.type == "cpu"

    def keys_transposed(self, device: torch.device, dtype: torch.dtype, kv_bits: int | None) -> bool:
        """16-bit unquantized caches on the compiled CPU path hold K transposed (see TRANSPOSED_K_DTYPES)."""
        return self.fused and device.type == "cpu" and kv_bits is None and dtype in TRANSPOSED_K_DTYPES

    def prepare(self, meta: AttentionMetadata, kv_layer: KVLayer) -> None:
        """Per-step precomputation shared by all layers (kv_layer: any layer's, for its shape), with numpy on
        the step's host arrays: each of its small ops costs a microsecond or two, a torch op ~5, and ~3x that
        after a forward has swept the caches (so a plain decode step takes the fewest ops)."""
        _, _, num_kv_heads, block_size, _ = kv_layer.shape
        tokens, table_rows, lens, long_prefills = self._split_queries(meta)
        slots = meta.slot_mapping_host if meta.slot_mapping_host is not None else meta.slot_mapping.cpu().numpy()
        token_idx = None
        if len(slots) and slots[-1] < 0:  # padding tokens (slot -1, after the step's tokens: runner._plan): not stored
            token_idx = np.flatnonzero(slots >= 0)
            slots = slots[token_idx]
        if num_kv_heads == 1:  # the cache viewed as [-1, head_dim] has one row per slot
            store_rows = slots
        else:
            blocks, offsets = slots // block_size, slots % block_size
            store_rows = ((blocks[:, None] * num_kv_heads + np.arange(num_kv_heads)[None, :]) * block_size
                          + offsets[:, None]).reshape(-1)
        device = meta.slot_mapping.device
        key_store = None
        if kv_layer.keys_transposed:
            key_store = (_tensor(store_rows // block_size, device), _tensor(store_rows % block_size, device))
        meta.backend_state = TorchStepState(
            buckets=self._decode_buckets(meta, tokens, table_rows, lens, block_size,
                                         self._fused_for(kv_layer, device) and compiled_decode.active),
            long_prefills=long_prefills, token_idx=None if token_idx is None else _tensor(token_idx, device),
            store_rows=_tensor(store_rows, device), key_store=key_store)

    def _split_queries(self, meta: AttentionMetadata) -> tuple[list[int], list[int], list[int], list[int]]:
        """(token index, block-table row, context length) of every query answered on the batched
        path: each decode, and each token of a short prefill chunk (guided jump-forward, the tail of
        a chunked prompt) as if it were a decode at its own position; and the sequences whose longer
        chunk attends with SDPA."""
        tokens, rows, lens = list(range(meta.num_decodes)), list(range(meta.num_decodes)), \
            list(meta.seq_lens_host[:meta.num_decodes])
        long_prefills = []
        starts = meta.query_start_loc_host
        for i in range(meta.num_decodes, meta.num_seqs):
            num_new = starts[i + 1] - starts[i]
            if num_new > self.SHORT_CHUNK:
                long_prefills.append(i)
                continue
            first_pos = meta.seq_lens_host[i] - num_new
            tokens += range(starts[i], starts[i + 1])
            rows += [i] * num_new
            lens += range(first_pos + 1, first_pos + num_new + 1)
        return tokens, rows, lens, long_prefills

    def _decode_buckets(self, meta: AttentionMetadata, tokens: list[int], table_rows: list[int], lens: list[int],
                        block_size: int, compiled: bool) -> list[DecodeBucket]:
        """compiled: the compiled decode attention answers them (MAX_PADDING applies)."""
        if not tokens:
            return []
        tables = meta.block_tables_host if meta.block_tables_host is not None else meta.block_tables.cpu().numpy()
        device = meta.seq_lens.device
        longest = max(lens)
        if longest <= self.BUCKET_GROWTH * min(lens) or (compiled and len(lens) * longest <= self.MAX_PADDING
                                                         * sum(lens)):
            # One bucket (most decode steps): the queries in step order; when they are the step's first rows
            # (decodes only) the layers read and write them in place, without an index.
            in_place = tokens[-1] == len(tokens) - 1 and table_rows[-1] == len(table_rows) - 1
            rows = slice(0, len(tokens)) if in_place else table_rows
            return [self._bucket(None if in_place else _tensor(np.array(tokens), device), tables[rows],
                                 np.array(lens), longest, block_size, device)]
        # Split from the longest context down: a bucket's queries are padded to its longest context, so the fine
        # buckets belong where contexts are long; the last bucket takes the shortest ones, whatever their spread
        # (64 contexts of 72-552 tokens: 25,920 keys read with padding, against 29,248 split from the shortest up,
        # where the last bucket spanned 230-542; benchmarks/throughput.py, bf16, 64 x 128, the two alternating:
        # 211.2 and 213.0 -> 231.0 and 217.9 tok/s).
        order = sorted(range(len(tokens)), key=lens.__getitem__, reverse=True)
        groups, current = [], [order[0]]
        for i in order[1:]:
            if lens[current[0]] > self.BUCKET_GROWTH * lens[i] and len(groups) < self.MAX_BUCKETS - 1:
                groups.append(current)
                current = []
            current.append(i)
        groups.append(current)
        groups = [group[::-1] for group in reversed(groups)]  # shortest first, as the buckets were made before
        # A lone query is answered twice (the same row, the same result, written once per copy): a one-row
        # bucket would be its own compiled variant (dynamo specializes a size of 1), first met mid-run. Seen
        # in a 32-prompt fp32 run: that compile stalled every running sequence 1.2 s with a cold compile
        # cache (throughput 243 against 286 tok/s warm), and its cached load still costs ~0.3 s per process.
        groups = [group * 2 if len(group) == 1 else group for group in groups]
        return [self._bucket(_tensor(np.array([tokens[i] for i in group]), device),
                             tables[[table_rows[i] for i in group]], np.array([lens[i] for i in group]),
                             lens[group[-1]], block_size, device) for group in groups]

    @staticmethod
    def _bucket(token_idx: torch.Tensor | None, tables: np.ndarray, lens: np.ndarray, max_len: int, block_size: int,
                device: torch.device) -> DecodeBucket:
        """tables: the block-table rows of the bucket's queries; lens: their context lengths (max_len the
        longest, as a plain int: a numpy reduction costs more than the Python max the caller already took)."""
        num_blocks = -(-max_len // block_size)
        blocks = tables[:, :num_blocks].astype(np.int64)
        if num_blocks == 1:  # contexts within one block: read it twice, the copy masked out (bias -inf), so
            # no compiled variant for one block (a size of 1, specialized) is met at every prompt's start and
            # replaced by another a block later, mid-generation
            num_blocks, blocks = 2, np.repeat(blocks, 2, axis=1)
        bias = np.where(np.arange(num_blocks * block_size)[None, :] >= lens[:, None], np.float32(-np.inf),
                        np.float32(0.0))
        return DecodeBucket(token_idx, _tensor(blocks, device), _tensor(bias, device))

    def _gather(self, kv_layer: KVLayer, chunks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[2, num_chunks, block_size, head_dim] of the listed (block, head) chunks of K and V
        (dequantized into the workspace when the cache is quantized)."""
        _, num_blocks, num_kv_heads, block_size, head_dim = kv_layer.shape
        shape = (2, chunks.numel(), block_size, head_dim)
        numel = 2 * chunks.numel() * block_size * head_dim
        ws = self._workspace
        device = kv_layer.data.device
        if ws is None or ws.dtype != dtype or ws.device != device or ws.numel() < numel:
            ws = self._workspace = torch.empty(numel, dtype=dtype, device=device)
        out = ws[:numel].view(shape)
        data = kv_layer.data.view(2, num_blocks * num_kv_heads, block_size, -1)
        if kv_layer.bits is None:
            torch.index_select(data, 1, chunks, out=out)
            if kv_layer.keys_transposed:  # K back to [block_size, D] per chunk (in place, through a copy)
                out[0].copy_(out[0].view(-1, head_dim, block_size).transpose(1, 2).clone())
        else:
            def gather(pool):
                return pool.view(2, num_blocks * num_kv_heads, block_size, -1).index_select(1, chunks)
            dequantize_kv(data.index_select(1, chunks), gather(kv_layer.scales), gather(kv_layer.zeros),
                          kv_layer.bits, out=out)
        return out

    @staticmethod
    def _blocks(kv_layer: KVLayer, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[2, len(blocks), Hkv, block_size, D] of whole blocks (dequantized when quantized)."""
        if kv_layer.bits is None:
            kv = kv_layer.data[:, blocks]
            if kv_layer.keys_transposed:
                n, num_kv_heads, block_size, head_dim = kv.shape[1:]
                kv = torch.stack((kv[0].view(n, num_kv_heads, head_dim, block_size).transpose(2, 3), kv[1]))
            return kv
        return dequantize_kv(kv_layer.data[:, blocks], kv_layer.scales[:, blocks], kv_layer.zeros[:, blocks],
                             kv_layer.bits, dtype)

    def _bucket_output(self, q: torch.Tensor, bucket: DecodeBucket, kv_layer: KVLayer, scale: float,
                       fused: bool) -> torch.Tensor:
        """[n, Hkv, group, D]: the attention of the bucket's queries over their contexts."""
        blocks, bias = bucket.blocks, bucket.bias
        n, length = bias.shape
        num_kv_heads, head_dim = kv_layer.shape[2], q.shape[-1]
        # The query heads of one KV head attend together: [n, Hkv, group, D] x [n, Hkv, D, L].
        rows = q[:n] if bucket.token_idx is None else q.index_select(0, bucket.token_idx)
        queries = rows.view(n, num_kv_heads, q.shape[1] // num_kv_heads, head_dim)
        if fused:
            o = fused_decode(queries, kv_layer.data, blocks, bias, scale, kv_layer.keys_transposed)
            if o is not None:
                return o
        if bucket.chunks is None:  # (block, head) chunk ids in [query, head, block] order, once a step
            bucket.chunks = (blocks[:, None, :] * num_kv_heads
                             + torch.arange(num_kv_heads, device=blocks.device)[None, :, None]).reshape(-1)
        kv = self._gather(kv_layer, bucket.chunks, q.dtype)
        keys = kv[0].view(n, num_kv_heads, length, head_dim)
        values = kv[1].view(n, num_kv_heads, length, head_dim)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale).add_(bias[:, None, None, :])
        return torch.matmul(torch.softmax(scores, dim=-1), values)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_layer: KVLayer,
                meta: AttentionMetadata, scale: float) -> torch.Tensor:
        """q: [T, Hq, D], k/v: [T, Hkv, D], kv_layer: one layer's KVLayer -> [T, Hq, D]."""
        state: TorchStepState = meta.backend_state
        store_kv(k, v, kv_layer, state)
        head_dim = k.shape[2]
        fused = self._fused_for(kv_layer, q.device)
        buckets = state.buckets
        if len(buckets) == 1 and buckets[0].token_idx is None and buckets[0].bias.shape[0] == q.shape[0]:
            return self._bucket_output(q, buckets[0], kv_layer, scale, fused).reshape(q.shape)  # decodes only
        out = torch.empty_like(q)
        if meta.query_start_loc_host[-1] < q.shape[0]:  # padding tokens (runner's shape buckets): in no sequence
            out[meta.query_start_loc_host[-1]:].zero_()
        for bucket in buckets:
            o = self._bucket_output(q, bucket, kv_layer, scale, fused)
            if bucket.token_idx is None:
                out[:o.shape[0]] = o.view(o.shape[0], -1, head_dim)
            else:
                out.index_copy_(0, bucket.token_idx, o.view(o.shape[0], -1, head_dim))
        block_size = kv_layer.shape[3]
        starts, lens = meta.query_start_loc_host, meta.seq_lens_host
        # Without bf16 arithmetic torch's CPU flash attention converts bf16 tile by tile: in fp32 it runs 1.5x
        # as fast (AVX2-only EPYC, 9 query and 3 KV heads, 300 tokens: 3.2 against 4.7 ms with the casts).
        sdpa_dtype = torch.float32 if q.dtype == torch.bfloat16 and q.device.type == "cpu" and \
            not native_bf16() else q.dtype
        for i in state.long_prefills:  # the other sequences were answered with the decodes above
            start, end, ctx_len = starts[i], starts[i + 1], lens[i]
            num_new = end - start
            qi = q[start:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            # No cached prefix: attend to this chunk's own K/V, unless the cache is quantized: then
            # always read it back, so results do not depend on chunking or prefix-cache hits (and
            # match the Triton kernels, which always read the cache).
            if ctx_len == num_new and kv_layer.bits is None:
                ki, vi = k[start:end].transpose(0, 1), v[start:end].transpose(0, 1)
                mask, causal = None, True
            else:
                blocks = meta.block_tables[i, : -(-ctx_len // block_size)].long()
                kv = self._blocks(kv_layer, blocks, q.dtype).transpose(2, 3).flatten(1, 2)[:, :ctx_len]
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
            oi = F.scaled_dot_product_attention(qi.to(sdpa_dtype), ki.unsqueeze(0).to(sdpa_dtype),
                                                vi.unsqueeze(0).to(sdpa_dtype), attn_mask=mask,
                                                is_causal=causal, scale=scale, enable_gqa=True)
            out[start:end] = oi[0, :, -num_new:].transpose(0, 1)
        return out


def _tensor(a: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(a)
    return t if device.type == "cpu" else t.to(device)


def store_kv(k: torch.Tensor, v: torch.Tensor, kv_layer: KVLayer, state: TorchStepState) -> None:
    """Write the step's K/V rows into their slots (slot -1 = padding, skipped), quantizing them
    when the cache is quantized."""
    if state.token_idx is not None:
        k, v = k[state.token_idx], v[state.token_idx]
    rows = state.store_rows
    if kv_layer.bits is None:
        write_kv_rows(kv_layer.data, rows, k, v, *(state.key_store or ()))
        return
    head_dim = k.shape[-1]
    for i, x in enumerate((k, v)):
        qx, sx, zx = quantize_kv(x.reshape(-1, head_dim), kv_layer.bits)
        kv_layer.data[i].view(-1, qx.shape[-1]).index_copy_(0, rows, qx)
        kv_layer.scales[i].view(-1, sx.shape[-1]).index_copy_(0, rows, sx)
        kv_layer.zeros[i].view(-1, zx.shape[-1]).index_copy_(0, rows, zx)


def write_kv_rows(data: torch.Tensor, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  key_chunks: torch.Tensor | None = None, key_offsets: torch.Tensor | None = None) -> None:
    """An unquantized cache's data [2, blocks, Hkv, block_size, D]: K and V rows ([T, Hkv, D]) into rows `rows`
    of each viewed as [-1, D]; with K transposed (key_chunks given), K rows into columns key_offsets of the
    [D, block_size] chunks key_chunks (as fast as the row copy: 192 rows of 64, ~10 us either way)."""
    head_dim = k.shape[-1]
    if key_chunks is None:
        data[0].view(-1, head_dim).index_copy_(0, rows, k.reshape(-1, head_dim))
    else:
        data[0].view(-1, head_dim, data.shape[-2]).transpose(1, 2).index_put_((key_chunks, key_offsets),
                                                                               k.reshape(-1, head_dim))
    data[1].view(-1, head_dim).index_copy_(0, rows, v.reshape(-1, head_dim))
