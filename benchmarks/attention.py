"""Paged attention on the CPU against the machine's roofline: each variant's time per layer call, the
KV bytes it must read over the measured memory bandwidth, and its FLOPs over the measured GEMM peak.

Shapes are the embedded model's (9 query heads, 3 KV heads, head_dim 64, blocks of 32 tokens):
decode, n sequences with contexts drawn from [min, max] tokens, the cache in the engine's layout
[2, blocks, kv_heads, block_size, head_dim] with the blocks of the sequences scattered over a pool;
prefill, one causal chunk.

Decode variants:
  compiled-gather   the engine's path: torch.compile'd elementwise products and sums that gather
                    (block, head) chunks inside the reduction (torch_backend.gathered_decode_attention), on
                    the cache layout the engine gives the dtype (16-bit: K chunks transposed, [D, block])
  gather+matmul     the engine's fallback: index_select into a workspace, then two batched matmuls
  sdpa-per-seq      per sequence: its blocks gathered, then torch's SDPA (what a plain port does)
  flex-head-major   FlexAttention (torch.compile) on a head-major copy of the pool (FlexAttention cannot
                    read the block-major layout in place; the copy is not timed: this says whether a
                    cache layout change would pay)
  compiled-other    compiled-gather on the other K layout (fp32: transposed, 16-bit: [block, D]; the copy
                    is not timed): says what the engine's layout choice pays
Prefill variants: sdpa (torch's CPU flash path with GQA), flex-causal (FlexAttention with a causal block
mask), blocked-matmul (query tiles x their causal prefix, GQA by grouping heads).

    python benchmarks/attention.py [--threads 2] [--seqs 64] [--min-ctx 300] [--max-ctx 500] [--dtype both]
                                   [--placement shuffled|consecutive|interleaved] [--cold]
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

HQ, HKV, D, BLOCK = 9, 3, 64, 32


def best_time(fn, repeat: int = 5, warmup: int = 2, sweep=None) -> float:
    """sweep: called before each timed call (out of the timing), to push the data out of the caches."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if sweep is not None:
            sweep()
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def measure_roofline(torch) -> dict:
    """Memory bandwidth (the best of: a reduction over 512 MiB, a 256 MiB copy counted read + write, a
    matrix-vector product over a 512 MiB matrix) and GEMM peak (2048^3 matmuls) of this machine."""
    big = torch.ones(128 << 20, dtype=torch.float32)
    half = big[: 64 << 20]
    dst = torch.empty_like(half)
    vec = torch.ones(4096)
    rates = [big.numel() * 4 / best_time(big.sum, repeat=5),
             2 * half.numel() * 4 / best_time(lambda: dst.copy_(half), repeat=5),
             big.numel() * 4 / best_time(lambda: torch.mv(big.view(-1, 4096), vec), repeat=5)]
    bandwidth = max(rates)

    peaks = {}
    for dtype in (torch.float32, torch.bfloat16):
        a, b = torch.randn(2048, 2048).to(dtype), torch.randn(2048, 2048).to(dtype)
        peaks[dtype] = 2 * 2048 ** 3 / best_time(lambda: torch.matmul(a, b), repeat=3)
    return {"bandwidth": bandwidth, "rates": rates, "peak": peaks}


def make_decode_case(torch, seqs: int, min_ctx: int, max_ctx: int, dtype, seed: int = 0,
                     placement: str = "shuffled"):
    """placement of the sequences' blocks in the pool: shuffled (scattered, as after hours of serving),
    consecutive (each sequence's blocks side by side, as a prompt's on a fresh pool), interleaved (block j of
    every sequence, then block j + 1: as decodes that grow in turns take them)."""
    rng = random.Random(seed)
    lens = [rng.randint(min_ctx, max_ctx) for _ in range(seqs)]
    blocks_per = [-(-n // BLOCK) for n in lens]
    pool = sum(blocks_per) + 16
    order = list(range(pool))
    if placement == "shuffled":
        rng.shuffle(order)
    if placement == "interleaved":
        tables = [[] for _ in blocks_per]
        for j in range(max(blocks_per)):
            for i, nb in enumerate(blocks_per):
                if j < nb:
                    tables[i].append(order.pop(0))
    else:
        tables, at = [], 0
        for nb in blocks_per:
            tables.append(order[at:at + nb])
            at += nb
    kv = torch.randn(2, pool, HKV, BLOCK, D).to(dtype)
    q = torch.randn(seqs, HQ, D).to(dtype)
    return lens, tables, kv, q


def decode_variants(torch, lens, tables, kv, q):
    import torch.nn.functional as F

    from dashinfer_core.layers.attention.torch_backend import TorchAttention, fused_decode
    n, scale = len(lens), D ** -0.5
    nblk = max(len(t) for t in tables)
    table = torch.tensor([t + [0] * (nblk - len(t)) for t in tables])
    heads = torch.arange(HKV)
    chunks = table[:, None, :] * HKV + heads[None, :, None]
    outside = torch.arange(nblk * BLOCK)[None, :] >= torch.tensor(lens)[:, None]
    bias = torch.zeros(outside.shape).masked_fill_(outside, float("-inf"))
    queries = q.view(n, HKV, HQ // HKV, D)
    pool_view = kv.view(2, -1, BLOCK, D)
    workspace = torch.empty(2, chunks.numel(), BLOCK, D, dtype=kv.dtype)

    def gather_matmul():
        torch.index_select(pool_view, 1, chunks.reshape(-1), out=workspace)
        keys = workspace[0].view(n, HKV, nblk * BLOCK, D)
        values = workspace[1].view(n, HKV, nblk * BLOCK, D)
        scores = torch.matmul(queries, keys.transpose(-1, -2)).mul_(scale).add_(bias[:, None, None, :])
        return torch.matmul(torch.softmax(scores, dim=-1), values)

    block_lists = [torch.tensor(t) for t in tables]

    def sdpa_per_seq():
        outs = []
        for i in range(n):
            blk = kv[:, block_lists[i]].transpose(2, 3).flatten(1, 2)[:, :lens[i]]  # [2, L, Hkv, D]
            outs.append(F.scaled_dot_product_attention(q[i][None, :, None, :], blk[0].transpose(0, 1)[None],
                                                       blk[1].transpose(0, 1)[None], scale=scale, enable_gqa=True))
        return outs

    transposed = pool_view.clone()  # each K chunk [D, block] in the same memory
    transposed[0] = pool_view[0].transpose(1, 2).contiguous().view(pool_view[0].shape)
    pools = {True: transposed.view(kv.shape), False: kv}
    layout = TorchAttention(fused=True).keys_transposed(torch.device("cpu"), kv.dtype, None)  # the engine's
    variants = {
        "compiled-gather": lambda: fused_decode(queries, pools[layout], table, bias, scale, layout),
        "gather+matmul": gather_matmul, "sdpa-per-seq": sdpa_per_seq,
        "compiled-other": lambda: fused_decode(queries, pools[not layout], table, bias, scale, not layout)}
    flex = flex_decode(torch, lens, tables, kv, q, scale)
    if flex is not None:
        variants["flex-head-major"] = flex
    return variants


def flex_decode(torch, lens, tables, kv, q, scale):
    """FlexAttention with one batch entry per sequence over a head-major pool [1, Hkv, slots, D], the
    block mask listing each sequence's own blocks. None (with the reason printed) where it fails."""
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        n, slots = len(lens), kv.shape[1] * BLOCK
        keys = kv[0].permute(1, 0, 2, 3).reshape(1, HKV, slots, D).contiguous()
        values = kv[1].permute(1, 0, 2, 3).reshape(1, HKV, slots, D).contiguous()
        owner = torch.full((kv.shape[1],), -1, dtype=torch.int64)
        rank = torch.zeros(kv.shape[1], dtype=torch.int64)
        for i, t in enumerate(tables):
            owner[torch.tensor(t)] = i
            rank[torch.tensor(t)] = torch.arange(len(t))
        seq_len = torch.tensor(lens)

        def mask_mod(b, h, q_idx, kv_idx):
            block = kv_idx // BLOCK
            return (owner[block] == b) & (rank[block] * BLOCK + kv_idx % BLOCK < seq_len[b])

        mask = create_block_mask(mask_mod, B=n, H=None, Q_LEN=1, KV_LEN=slots, device="cpu",
                                 BLOCK_SIZE=(1, BLOCK))
        compiled = torch.compile(flex_attention, dynamic=False)
        qf = q[:, :, None, :]  # [n, Hq, 1, D]
        kb, vb = keys.expand(n, -1, -1, -1), values.expand(n, -1, -1, -1)

        def run():
            return compiled(qf, kb, vb, block_mask=mask, scale=scale, enable_gqa=True)
        run()
        return run
    except Exception as exc:  # report, do not stop the other variants
        print(f"  flex-head-major: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
        return None


def prefill_variants(torch, length: int, dtype):
    import torch.nn.functional as F
    scale = D ** -0.5
    q = torch.randn(1, HQ, length, D).to(dtype)
    k = torch.randn(1, HKV, length, D).to(dtype)
    v = torch.randn(1, HKV, length, D).to(dtype)
    group = HQ // HKV

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)

    tile = 128
    qg = q.view(HKV, group, length, D)

    def blocked():
        out = torch.empty(HKV, group, length, D, dtype=dtype)
        for start in range(0, length, tile):
            end = min(start + tile, length)
            s = torch.matmul(qg[:, :, start:end], k[0, :, None, :end].transpose(-1, -2)) * scale
            causal = torch.arange(end)[None, :] > torch.arange(start, end)[:, None]
            s = s.float().masked_fill_(causal, float("-inf"))
            out[:, :, start:end] = torch.matmul(torch.softmax(s, -1).to(dtype), v[0, :, None, :end])
        return out

    variants = {"sdpa": sdpa, "blocked-matmul": blocked}
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        mask = create_block_mask(lambda b, h, qi, ki: ki <= qi, B=None, H=None, Q_LEN=length, KV_LEN=length,
                                 device="cpu")
        compiled = torch.compile(flex_attention, dynamic=False)

        def flex():
            return compiled(q, k, v, block_mask=mask, scale=scale, enable_gqa=True)
        flex()
        variants["flex-causal"] = flex
    except Exception as exc:
        print(f"  flex-causal: unavailable ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})", flush=True)
    return variants


def main(argv=None) -> int:
    global BLOCK
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seqs", type=int, default=64)
    p.add_argument("--min-ctx", type=int, default=300)
    p.add_argument("--max-ctx", type=int, default=500)
    p.add_argument("--prefill", type=int, default=512, help="prefill chunk length")
    p.add_argument("--dtype", default="both", choices=["float32", "bfloat16", "both"])
    p.add_argument("--placement", default="shuffled", choices=["shuffled", "consecutive", "interleaved"],
                   help="where each sequence's blocks sit in the pool")
    p.add_argument("--cold", action="store_true", help="sweep the caches before each decode call (a step's "
                   "layers read ~30x the cache one layer reads: in the engine each layer's KV comes from memory)")
    p.add_argument("--block-size", type=int, default=32, help="tokens per KV block (the engine's block_size)")
    p.add_argument("--variants", default="", help="comma-separated decode variants to time (default: all)")
    p.add_argument("--no-prefill", action="store_true", help="decode variants only")
    args = p.parse_args(argv)
    BLOCK = args.block_size
    import torch
    torch.set_num_threads(args.threads)
    from dashinfer_core.capabilities import detect
    roof = measure_roofline(torch)
    print(f"CPU: {detect().cpu_capability}, {args.threads} threads; measured bandwidth "
          f"{roof['bandwidth'] / 1e9:.1f} GB/s (sum / copy / mv: "
          f"{' / '.join(f'{r / 1e9:.1f}' for r in roof['rates'])}), GEMM peak fp32 {roof['peak'][torch.float32] / 1e9:.0f} "
          f"/ bf16 {roof['peak'][torch.bfloat16] / 1e9:.0f} GFLOP/s")
    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "both" else [getattr(torch, args.dtype)]
    sweep = None
    if args.cold:
        flood = torch.ones(64 << 20, dtype=torch.bfloat16)  # 128 MiB, 4x the largest L3 in sight
        sweep = flood.sum
    for dtype in dtypes:
        lens, tables, kv, q = make_decode_case(torch, args.seqs, args.min_ctx, args.max_ctx, dtype,
                                               placement=args.placement)
        kv_bytes = sum(lens) * HKV * D * 2 * kv.element_size()
        flops = 4 * sum(lens) * HQ * D
        floor = max(kv_bytes / roof["bandwidth"], flops / roof["peak"][dtype])
        print(f"\ndecode, {str(dtype)[6:]}: {args.seqs} sequences, contexts {args.min_ctx}-{args.max_ctx} "
              f"(sum {sum(lens)}), blocks of {BLOCK} {args.placement}{', caches swept' if args.cold else ''}, KV read "
              f"{kv_bytes / 2**20:.1f} MiB per layer; roofline {floor * 1e3:.3f} ms")
        print(f"{'variant':<18}{'ms/layer':>10}{'GB/s':>8}{'% bw':>7}{'GFLOP/s':>9}{'% peak':>8}{'x roofline':>12}")
        for name, fn in decode_variants(torch, lens, tables, kv, q).items():
            if args.variants and name not in args.variants.split(","):
                continue
            t = best_time(fn, sweep=sweep)
            print(f"{name:<18}{t * 1e3:>10.3f}{kv_bytes / t / 1e9:>8.1f}{100 * kv_bytes / t / roof['bandwidth']:>6.0f}%"
                  f"{flops / t / 1e9:>9.1f}{100 * flops / t / roof['peak'][dtype]:>7.1f}%{t / floor:>12.1f}")
        if args.no_prefill:
            continue
        length = args.prefill
        pf_flops = 4 * HQ * D * length * (length + 1) / 2  # causal: half the score matrix
        print(f"\nprefill, {str(dtype)[6:]}: one causal chunk of {length} tokens, {pf_flops / 1e9:.2f} GFLOP "
              f"(causal half); roofline {pf_flops / roof['peak'][dtype] * 1e3:.2f} ms")
        print(f"{'variant':<18}{'ms':>10}{'GFLOP/s':>9}{'% peak':>8}")
        for name, fn in prefill_variants(torch, length, dtype).items():
            t = best_time(fn, repeat=3)
            print(f"{name:<18}{t * 1e3:>10.2f}{pf_flops / t / 1e9:>9.1f}{100 * pf_flops / t / roof['peak'][dtype]:>7.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
