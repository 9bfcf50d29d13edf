"""The prefix cache's disk tier: restarts hit, the output never changes, anything that shapes KV
differently misses, bad files are skipped and deleted, the budget holds, engines share a directory, and
an unwritable or full disk turns the tier off while serving goes on."""
from __future__ import annotations

import asyncio
import errno
import logging
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from dashinfer_core import LLM, AsyncEngine, EngineConfig, InvalidParameterError, SamplingParams
from dashinfer_core.cache.disk_store import SUFFIX, BlockFile, DiskStore
from dashinfer_core.cache.kv_cache import bytes_per_block
from helpers import build_tiny_model, mixed_prompts

BS = 16
BLOCK_BYTES = bytes_per_block(2, BS, 2, 16, torch.float32)  # the tiny llama's block
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def make_llm(model_dir, directory, blocks=200, **kw):
    kw.setdefault("dtype", "float32")
    return LLM(str(model_dir), device="cpu", block_size=kw.pop("block_size", BS),
               kv_cache_memory=blocks * BLOCK_BYTES, disk_cache_dir=str(directory), **kw)


def prompts():
    system = mixed_prompts(1, min_len=70, max_len=70, seed=200)[0]  # 4 full blocks shared
    return [system + t for t in mixed_prompts(4, min_len=5, max_len=40, seed=201)] + \
        mixed_prompts(4, min_len=20, max_len=90, seed=202)


def full_block_tokens(prompt):
    return (len(prompt) - 1) // BS * BS


def files(directory) -> list[Path]:
    return sorted(Path(directory).glob(f"*{SUFFIX}"))


def assert_no_leak(llm):
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_requests == 0
    bm = llm.engine.scheduler.block_manager
    assert not any(bm.ref_counts)
    assert not llm.engine.disk.parked


@pytest.fixture(scope="module")
def reference(tiny_models):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=BS, enable_prefix_caching=False)
    return [o.token_ids for o in llm.generate(prompts(), PARAMS)]


def filled_directory(tiny_models, tmp_path, **kw):
    """A directory written by one engine that then shut down (its writes flushed)."""
    llm = make_llm(tiny_models["llama"], tmp_path, **kw)
    outs = llm.generate(prompts(), PARAMS)
    llm.shutdown()
    return llm, outs


def test_a_restarted_engine_hits_the_disk_and_gives_identical_tokens(tiny_models, reference, tmp_path):
    first, outs = filled_directory(tiny_models, tmp_path)
    assert [o.token_ids for o in outs] == reference
    assert first.engine.stats().disk_writes == len(files(tmp_path)) > 0
    llm = make_llm(tiny_models["llama"], tmp_path)  # "after a restart": a new engine, nothing in memory
    again = llm.generate(prompts(), PARAMS)
    assert [o.token_ids for o in again] == reference
    for prompt, out in zip(prompts(), again):
        assert out.num_cached_tokens == full_block_tokens(prompt)
    # The shared system prompt is read once (by the first of its requests); the others hit it in memory.
    assert sum(o.num_disk_cached_tokens for o in again) == llm.engine.stats().disk_hit_tokens > 0
    assert llm.engine.stats().disk_reads * BS == llm.engine.stats().disk_hit_tokens  # each block read once
    assert llm.engine.stats().disk_corrupted == 0
    assert_no_leak(llm)
    llm.shutdown()


@pytest.mark.parametrize("options", [dict(kv_cache_dtype="int8"), dict(kv_cache_dtype="uint4"),
                                     dict(dtype="bfloat16"), dict(speculative={"method": "ngram",
                                                                             "num_speculative_tokens": 3}),
                                     dict(speculative={"method": "draft", "num_speculative_tokens": 2})],
                         ids=["kv-int8", "kv-uint4", "bf16", "ngram", "draft"])
def test_restart_hits_with_quantized_kv_bf16_and_speculation(tiny_models, tmp_path, options):
    if "speculative" in options and options["speculative"]["method"] == "draft":  # the model drafts for itself
        options = dict(speculative={**options["speculative"], "model": str(tiny_models["llama"])})
    # The reference: the same settings without the disk tier, every full block hit in memory (quantized KV
    # and bf16 change the tokens; in bf16 a prefix hit may too, as the GEMMs then see other shapes).
    kw = {k: v for k, v in options.items() if k != "speculative"}
    memory = LLM(str(tiny_models["llama"]), device="cpu", block_size=BS, **{"dtype": "float32", **kw})
    memory.generate(prompts(), PARAMS)
    reference = [o.token_ids for o in memory.generate(prompts(), PARAMS)]
    first = make_llm(tiny_models["llama"], tmp_path, **options)
    first.generate(prompts(), PARAMS)
    first.shutdown()
    llm = make_llm(tiny_models["llama"], tmp_path, **options)
    outs = llm.generate(prompts(), PARAMS)
    assert [o.token_ids for o in outs] == reference
    assert [o.num_cached_tokens for o in outs] == [full_block_tokens(p) for p in prompts()]
    stats = llm.engine.stats()
    assert stats.disk_hit_tokens > 0 and stats.disk_corrupted == 0
    assert_no_leak(llm)
    llm.shutdown()


def test_blocks_evicted_from_memory_go_to_disk_without_write_behind(tiny_models, reference, tmp_path):
    # 12 device blocks and a 4-block CPU tier for 8 prompts of up to 7 blocks: evictions from both tiers.
    llm = make_llm(tiny_models["llama"], tmp_path, blocks=12, cpu_cache_memory=4 * BLOCK_BYTES,
                   disk_cache_write_behind=False, max_num_batched_tokens=64)
    assert [o.token_ids for o in llm.generate(prompts(), PARAMS)] == reference
    llm.engine.disk.store.flush()
    written = llm.engine.stats().disk_writes
    assert written > 0 and llm.engine.stats().prefix_evictions > 0
    again = llm.generate(prompts(), PARAMS)  # evicted blocks come back from disk, in the same engine
    assert [o.token_ids for o in again] == reference
    assert llm.engine.stats().disk_hit_tokens > 0
    assert_no_leak(llm)
    llm.shutdown()


@pytest.mark.parametrize("change", ["dtype", "kv_cache_dtype", "block_size", "model"])
def test_a_change_that_shapes_kv_differently_never_hits(tiny_models, default_model_dir, tmp_path, change):
    filled_directory(tiny_models, tmp_path)
    before = set(files(tmp_path))
    model, kw = tiny_models["llama"], {}
    if change == "dtype":
        kw["dtype"] = "bfloat16"
    elif change == "kv_cache_dtype":
        kw["kv_cache_dtype"] = "int8"
    elif change == "block_size":
        kw["block_size"] = 32
    else:  # same architecture and tokenizer, other weights
        model = build_tiny_model("llama", tmp_path.parent / f"{tmp_path.name}-llama", default_model_dir, seed=7)
    llm = make_llm(model, tmp_path, **kw)
    outs = llm.generate(prompts(), PARAMS)
    stats = llm.engine.stats()
    assert stats.disk_hit_tokens == 0 and stats.disk_reads == 0 and stats.disk_corrupted == 0
    assert sum(o.num_disk_cached_tokens for o in outs) == 0
    llm.shutdown()
    assert before < set(files(tmp_path))  # its own files beside the first engine's, none overwritten


def test_corrupted_truncated_and_foreign_files_are_skipped_and_deleted(tiny_models, reference, tmp_path):
    filled_directory(tiny_models, tmp_path)
    llm = make_llm(tiny_models["llama"], tmp_path)
    tier = llm.engine.disk
    # The first block of three of the unrelated prompts: each request reads its run from there.
    victims = []
    for prompt in prompts()[4:7]:
        seq = SimpleNamespace(disk_digests=[], token_ids=prompt, request=SimpleNamespace(cache_salt=None, mm=None, lora=None))
        victims.append(Path(tier.store.path_of(tier.digests(seq, 1)[0])))
    assert all(v.exists() for v in victims)
    data = bytearray(victims[0].read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped bit-pattern in the payload
    victims[0].write_bytes(bytes(data))
    victims[1].write_bytes(victims[1].read_bytes()[:-100])  # truncated
    foreign = files(tmp_path)[0] if files(tmp_path)[0] not in victims else files(tmp_path)[-1]
    victims[2].write_bytes(foreign.read_bytes())  # a whole, valid file of another block
    outs = llm.generate(prompts(), PARAMS)
    assert [o.token_ids for o in outs] == reference
    assert llm.engine.stats().disk_corrupted == 3
    for prompt, out in zip(prompts()[4:7], outs[4:7]):
        assert out.num_disk_cached_tokens == 0
    assert sum(o.num_disk_cached_tokens for o in outs) > 0  # the intact files still served
    assert_no_leak(llm)
    llm.shutdown()
    # The bad files were deleted; the blocks, computed again, were written again, whole.
    fresh = make_llm(tiny_models["llama"], tmp_path)
    outs = fresh.generate(prompts()[4:7], PARAMS)
    assert [o.token_ids for o in outs] == reference[4:7]
    assert fresh.engine.stats().disk_corrupted == 0
    assert [o.num_disk_cached_tokens for o in outs] == [full_block_tokens(p) for p in prompts()[4:7]]
    fresh.shutdown()


def test_the_directory_stays_under_its_budget(tiny_models, reference, tmp_path):
    file_size = BLOCK_BYTES + 1024  # a block and its header, at most
    budget = 6 * file_size
    llm = make_llm(tiny_models["llama"], tmp_path, disk_cache_bytes=budget)
    for _ in range(2):
        assert [o.token_ids for o in llm.generate(prompts(), PARAMS)] == reference
        llm.engine.disk.store.flush()
        assert sum(f.stat().st_size for f in files(tmp_path)) <= budget
    stats = llm.engine.stats()
    assert stats.disk_evictions > 0 and stats.disk_writes > len(files(tmp_path))
    assert_no_leak(llm)
    llm.shutdown()


def test_two_engines_writing_one_directory(tiny_models, reference, tmp_path):
    engines = [make_llm(tiny_models["llama"], tmp_path) for _ in range(2)]
    results = [None, None]

    def serve(i):  # the same prompts, in two orders: both write every block, at the same time
        order = prompts() if i == 0 else prompts()[::-1]
        results[i] = [o.token_ids for o in engines[i].generate(order, PARAMS)]
    threads = [threading.Thread(target=serve, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results[0] == reference and results[1] == reference[::-1]
    for llm in engines:
        llm.shutdown()
    assert not list(tmp_path.glob("*.tmp"))
    third = make_llm(tiny_models["llama"], tmp_path)
    assert [o.token_ids for o in third.generate(prompts(), PARAMS)] == reference
    stats = third.engine.stats()
    assert stats.disk_corrupted == 0 and stats.disk_reads * BS == stats.disk_hit_tokens > 0
    third.shutdown()


def test_an_unwritable_directory_turns_the_tier_off_and_serving_goes_on(tiny_models, reference, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with caplog.at_level(logging.WARNING, logger="dashinfer_core.cache.disk_store"):
        llm = make_llm(tiny_models["llama"], blocker / "cache")
    assert any("disk KV tier turned off" in r.message for r in caplog.records)
    assert [o.token_ids for o in llm.generate(prompts(), PARAMS)] == reference
    stats = llm.engine.stats()
    assert not stats.disk_enabled and stats.disk_writes == 0
    assert_no_leak(llm)
    llm.shutdown()


def test_a_full_disk_turns_the_tier_off_and_serving_goes_on(tiny_models, reference, tmp_path, monkeypatch, caplog):
    def no_space(self, block):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(DiskStore, "_write", no_space)
    llm = make_llm(tiny_models["llama"], tmp_path)
    with caplog.at_level(logging.WARNING, logger="dashinfer_core.cache.disk_store"):
        assert [o.token_ids for o in llm.generate(prompts(), PARAMS)] == reference
        llm.engine.disk.store.flush()
    assert not llm.engine.stats().disk_enabled
    assert any("No space left" in r.message for r in caplog.records)
    assert [o.token_ids for o in llm.generate(prompts(), PARAMS)] == reference  # and it keeps serving
    assert_no_leak(llm)
    llm.shutdown()
    assert not files(tmp_path)


def test_a_request_aborted_while_its_blocks_are_read(tiny_models, tmp_path):
    filled_directory(tiny_models, tmp_path)
    llm = make_llm(tiny_models["llama"], tmp_path)
    engine = llm.engine
    request = engine.add_request("r", prompts()[0], PARAMS)
    assert request.request_id in engine.disk.parked  # waiting for its blocks, not in the scheduler's queue
    assert not engine.scheduler.waiting
    engine.abort_request("r")
    while engine.has_unfinished_requests():
        engine.step()
    assert not engine.disk.parked
    assert_no_leak(llm)
    llm.shutdown()


def test_async_engine_streams_a_disk_hit(tiny_models, reference, tmp_path):
    filled_directory(tiny_models, tmp_path)
    from dashinfer_core.metrics import Metrics
    from test_openai_fields import metric_samples
    engine = AsyncEngine(model=str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=BS,
                         kv_cache_memory=200 * BLOCK_BYTES, disk_cache_dir=str(tmp_path))
    metrics = Metrics()
    metrics.attach(engine, "tiny")

    async def run():
        last = None
        async for out in engine.generate(prompts()[0], PARAMS):
            last = out
        return last
    try:
        last = asyncio.run(run())
        assert last.outputs[0].token_ids == reference[0]
        assert last.num_disk_cached_tokens == full_block_tokens(prompts()[0])
        got = metric_samples(metrics.exposition()[0].decode(), "tiny")
        assert got["dashinfer:prefix_cache_disk_hit_tokens_total"] == full_block_tokens(prompts()[0])
    finally:
        engine.shutdown()


def test_store_round_trip_is_byte_exact(tmp_path):
    store = DiskStore(str(tmp_path), 1 << 20, "fp", "abcd")
    arrays = [torch.randn(2, 2, 3, 4, 5).to(torch.bfloat16), torch.randint(0, 255, (2, 2, 3, 4, 6), dtype=torch.uint8)]
    store.write_async(BlockFile("d1", (1, 2, 3), arrays))
    store.flush()
    expected = [(a.dtype, tuple(a.shape)) for a in arrays]
    back = store.read_async(["d1"], [(1, 2, 3)], expected).result()
    assert len(back) == 1 and all(torch.equal(a, b) for a, b in zip(arrays, back[0].arrays))
    assert store.read_async(["d1"], [(1, 2, 4)], expected).result() == []  # other tokens: not this block
    assert store.stats.corrupted == 1 and not os.path.exists(store.path_of("d1"))
    store.shutdown()


def test_bad_settings_name_the_field(tiny_models, tmp_path):
    with pytest.raises(InvalidParameterError, match="disk_cache_bytes"):
        EngineConfig(disk_cache_dir=str(tmp_path), disk_cache_bytes=0)
    with pytest.raises(InvalidParameterError, match="disk_cache_dir.*enable_prefix_caching"):
        EngineConfig(disk_cache_dir=str(tmp_path), enable_prefix_caching=False)


def test_the_command_line_the_worker_and_litellm_take_it(tmp_path):
    import argparse

    from dashinfer_core.engine_args import add_engine_args, engine_config_from_args
    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    args = parser.parse_args(["--disk-cache-dir", str(tmp_path), "--disk-cache-bytes", "1000000",
                              "--no-disk-cache-write-behind"])
    config = engine_config_from_args(args)
    assert (config.disk_cache_dir, config.disk_cache_bytes, config.disk_cache_write_behind) == \
        (str(tmp_path), 1000000, False)
    worker = pytest.importorskip("dashinfer_fastchat.worker")
    args = worker.build_parser().parse_args(["--model-path", "default", "--disk-cache-dir", str(tmp_path)])
    assert worker.worker_engine_config(args).disk_cache_dir == str(tmp_path)
    provider = pytest.importorskip("dashinfer_litellm.provider")
    engine_options, sampling = provider.split_params({"disk_cache_dir": str(tmp_path), "disk_cache_bytes": 10,
                                                      "temperature": 0.0}, "default")
    assert engine_options == {"disk_cache_dir": str(tmp_path), "disk_cache_bytes": 10}
    assert "disk_cache_dir" not in sampling


def test_lora_blocks_are_named_by_the_adapters_weights(tiny_models, tmp_path):
    from dashinfer_core import LoRARequest
    from helpers import make_adapter
    base = tiny_models["llama"]
    paths = [make_adapter(base, tmp_path / f"adapter-{seed}", seed, r=4, lora_alpha=8,
                          target_modules=["k_proj", "v_proj"]) for seed in (1, 2)]
    prompt = prompts()[0]
    cache = tmp_path / "cache"

    def serve(lora):
        llm = make_llm(base, cache, enable_lora=True, max_lora_rank=8)
        out = llm.generate([prompt], PARAMS, lora_request=lora)[0]
        llm.shutdown()
        return out
    reference = {i: LLM(str(base), dtype="float32", device="cpu", block_size=BS, enable_prefix_caching=False,
                        enable_lora=True, max_lora_rank=8).generate([prompt], PARAMS, lora_request=LoRARequest(
                            "a", 1, str(p)))[0].outputs[0].token_ids for i, p in enumerate(paths)}
    first = serve(LoRARequest("one", 1, str(paths[0])))
    assert first.num_disk_cached_tokens == 0 and first.outputs[0].token_ids == reference[0]
    # After a restart, the same weights under another name and id hit; another adapter and the base model miss.
    again = serve(LoRARequest("renamed", 7, str(paths[0])))
    assert again.num_disk_cached_tokens == full_block_tokens(prompt) and again.outputs[0].token_ids == reference[0]
    other = serve(LoRARequest("two", 2, str(paths[1])))
    assert other.num_disk_cached_tokens == 0 and other.outputs[0].token_ids == reference[1]
    assert serve(None).num_disk_cached_tokens == 0


def test_tensor_parallel_ranks_keep_their_own_shards(tiny_models, tmp_path):
    common = dict(dtype="float32", device="cpu", block_size=BS, disk_cache_dir=str(tmp_path), tensor_parallel_size=2)
    model = str(tiny_models["llama"])
    first = LLM(model, **common)
    try:
        first.generate(prompts(), PARAMS)
        reference = [o.token_ids for o in first.generate(prompts(), PARAMS)]  # every full block hit in memory
        own = first.engine.disk.store.name_prefix
    finally:
        first.shutdown()
    by_rank: dict[str, list[Path]] = {}
    for f in files(tmp_path):
        by_rank.setdefault(f.name.split("-")[0], []).append(f)
    assert set(by_rank) >= {own} and len(by_rank) == 2  # rank 1 names its files by its own fingerprint
    other = next(p for p in by_rank if p != own)
    assert len(by_rank[own]) == len(by_rank[other])

    second = LLM(model, **common)
    try:
        outs = second.generate(prompts(), PARAMS)
        assert [o.token_ids for o in outs] == reference
        assert second.engine.stats().disk_hit_tokens == sum(o.num_disk_cached_tokens for o in outs) > 0
    finally:
        second.shutdown()

    for f in by_rank[other]:  # rank 1's copies are all truncated: rank 0's alone must not be served
        f.write_bytes(f.read_bytes()[:-64])
    third = LLM(model, **common)
    try:
        outs = third.generate(prompts(), PARAMS)
        assert [o.token_ids for o in outs] == reference
        stats = third.engine.stats()
        assert stats.disk_hit_tokens == 0 and stats.disk_corrupted == 0  # rank 0's files were fine
        assert stats.num_free_blocks == stats.num_blocks and not third.engine.disk.parked
        tier = third.engine.disk
        wanted = set()
        for prompt in [prompts()[0]] + prompts()[4:]:  # those read (the others' tails were never looked at)
            seq = SimpleNamespace(disk_digests=[], token_ids=prompt,
                                  request=SimpleNamespace(cache_salt=None, mm=None, lora=None))
            wanted.update(tier.digests(seq, (len(prompt) - 1) // BS))
    finally:
        third.shutdown()
    # Both ranks dropped the prompt blocks they could not agree on and, computing them again, wrote them again
    # (the same size on both: the headers differ only in the rank).
    for digest in wanted:
        mine, theirs = (tmp_path / f"{p}-{digest}{SUFFIX}" for p in (own, other))
        assert theirs.stat().st_size == mine.stat().st_size
