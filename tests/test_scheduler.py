"""Scheduler and block manager on their own (no model)."""
from __future__ import annotations

from dashinfer_core.cache.block_manager import BlockManager, BlockOps
from dashinfer_core.engine.scheduler import Scheduler
from dashinfer_core.engine.sequence import Request, Sequence
from dashinfer_core.sampling_params import SamplingParams


def make_seq(num_tokens: int, priority: int = 0) -> Sequence:
    request = Request(request_id=f"r{num_tokens}-{priority}", prompt=None, prompt_token_ids=list(range(num_tokens)),
                      params=SamplingParams(), seed=0, priority=priority)
    seq = Sequence(request=request, index=0, token_ids=list(range(num_tokens)), num_prompt_tokens=num_tokens)
    request.sequences.append(seq)
    return seq


def run_step(scheduler: Scheduler, sample_token: int = 7):
    batch = scheduler.schedule()
    scheduler.finish_step(batch)
    for seq in batch.seqs:
        if seq.num_computed_tokens == seq.num_tokens:
            seq.token_ids.append(sample_token)
    return batch


def test_long_prompt_is_chunked_while_others_decode():
    bm = BlockManager(num_blocks=64, block_size=16)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=32)
    short = make_seq(10)
    sched.add(short)
    run_step(sched)  # short prefilled, now decoding
    long = make_seq(100)
    sched.add(long)
    chunks = []
    for _ in range(4):
        batch = run_step(sched)
        assert batch.seqs[0] is short and batch.num_new_tokens[0] == 1  # decode first, every step
        chunks.append(dict(zip(map(id, batch.seqs), batch.num_new_tokens)).get(id(long)))
        assert batch.num_tokens <= 32
    assert chunks == [31, 31, 31, 7]
    assert long.num_computed_tokens == 100 and long.num_output_tokens == 1


def test_preemption_frees_the_newest_and_it_resumes():
    bm = BlockManager(num_blocks=4, block_size=16)
    sched = Scheduler(bm, max_num_seqs=8, max_num_batched_tokens=256)
    a, b = make_seq(30), make_seq(30)
    sched.add(a)
    sched.add(b)
    run_step(sched)
    assert bm.num_free_blocks == 0
    steps = 0
    while True:  # decode until a crosses into its third block: no room, so b (newer) is preempted
        tokens_before = b.num_tokens
        batch = run_step(sched)
        steps += 1
        if batch.preempted:
            break
    assert steps == 3 and batch.preempted == [b] and batch.seqs == [a]
    assert b.num_computed_tokens == 0 and not b.block_table
    assert b.num_tokens == tokens_before == 33  # keeps what it generated before preemption
    while a.num_tokens < 48:
        run_step(sched)
    sched.remove(a)  # a finishes: b is recomputed from its 33 tokens
    batch = run_step(sched)
    assert batch.seqs == [b] and batch.num_new_tokens == [33]
    sched.remove(b)
    assert bm.num_free_blocks == 4


def test_max_num_seqs_and_priority_order():
    bm = BlockManager(num_blocks=64, block_size=16)
    sched = Scheduler(bm, max_num_seqs=2, max_num_batched_tokens=1000)
    low = [make_seq(5, priority=3) for _ in range(2)]
    high = make_seq(6, priority=0)
    for s in low + [high]:
        sched.add(s)
    batch = run_step(sched)
    assert batch.seqs[0] is high and len(batch.seqs) == 2


def test_fork_shares_blocks_and_copies_on_write():
    bm = BlockManager(num_blocks=8, block_size=16)
    parent = make_seq(20)
    ops = BlockOps()
    assert bm.allocate(parent, 20, ops)
    parent.num_computed_tokens = 20
    child = make_seq(20)
    bm.fork(parent, child)
    child.num_computed_tokens = 20
    assert child.block_table == parent.block_table and bm.ref_counts[parent.block_table[1]] == 2
    # The child writes position 20, in the shared partial block 1: it gets a private copy.
    assert bm.allocate(child, 21, ops)
    assert ops.copies == [(parent.block_table[1], child.block_table[1])]
    assert child.block_table[0] == parent.block_table[0]  # full block still shared
    assert bm.ref_counts[parent.block_table[0]] == 2 and bm.ref_counts[parent.block_table[1]] == 1
    bm.free(child)
    bm.free(parent)
    assert bm.num_free_blocks == 8 and not any(bm.ref_counts)


def test_fresh_blocks_are_zeroed_in_every_layer_and_pool():
    """A block used for the first time holds whatever the allocation held (NaN here): zero_blocks clears it in
    every layer, K and V, and the scales and zeros of a quantized cache, and touches no other block."""
    import torch
    from dashinfer_core.cache.kv_cache import KVCache
    for kv_bits in (None, 8):
        cache = KVCache(num_layers=3, num_blocks=6, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32,
                        device=torch.device("cpu"), kv_bits=kv_bits)
        for pool in cache.pools:
            pool.fill_(7 if pool.dtype == torch.uint8 else float("nan"))
        cache.apply(BlockOps(fresh=[1, 4]))
        for pool in cache.pools:
            assert (pool[:, :, [1, 4]] == 0).all()
            rest = pool[:, :, [0, 2, 3, 5]]
            assert (rest == 7).all() if pool.dtype == torch.uint8 else rest.isnan().all()
