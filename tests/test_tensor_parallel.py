"""Tensor parallel on the CPU over gloo: two ranks (this process and one it starts) give what one
rank gives, through preemption, chunked prefill, quantization, the prefix cache, guided decoding and
n > 1; bad sizes are refused before any rank starts; a rank that dies ends the engine without
leaving a process behind; ranks started by hand through env:// (as torchrun does) work too."""
from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from dashinfer_core import LLM, AsyncEngine, EngineConfig, EngineDeadError, InvalidParameterError, SamplingParams
from dashinfer_core.cache.kv_cache import bytes_per_block
from helpers import compare_greedy, hf_greedy, mixed_prompts
from servers import free_port

BS = 16
HEAD_DIM = 16  # tiny models: hidden 64 / 4 heads


def kv_bytes(blocks: int, kv_heads_per_rank: int) -> int:
    """A budget of `blocks` KV blocks for one rank of a tiny (2-layer) model."""
    return blocks * bytes_per_block(2, BS, kv_heads_per_rank, HEAD_DIM, __import__("torch").float32)


def assert_same_greedy(tp1_outs, tp2_outs, model_dir, prompts, max_tokens):
    """Token for token, or a first difference at a numerical tie of HF's logits (the core's allowance:
    the all-reduce sums in another order)."""
    different = [i for i, (a, b) in enumerate(zip(tp1_outs, tp2_outs)) if a.outputs[0].token_ids != b.outputs[0].token_ids]
    if not different:
        return
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    for i in different:
        ref = hf_greedy(model, prompts[i], max_tokens)
        assert compare_greedy(tp2_outs[i].outputs[0].token_ids, ref) == "tie", (i, tp1_outs[i], tp2_outs[i])


def ranks_gone(llm_engine) -> bool:
    return all(p.poll() is not None for p in llm_engine.runner.ranks.processes)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tp2_greedy_matches_tp1_with_preemption_and_chunked_prefill(tiny_models, family):
    prompts = mixed_prompts(16, max_len=90, seed=3)
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    # 20 blocks for 16 sequences of up to 102 tokens: preemption; 48 tokens a step: chunked prompts.
    common = dict(dtype="float32", device="cpu", block_size=BS, max_num_batched_tokens=48, max_num_seqs=16)
    one = LLM(str(tiny_models[family]), kv_cache_memory=kv_bytes(20, 2), **common)
    tp1 = one.generate(prompts, params)
    two = LLM(str(tiny_models[family]), tensor_parallel_size=2, kv_cache_memory=kv_bytes(20, 1), **common)
    try:
        tp2 = two.generate(prompts, params)
        stats = two.engine.stats()
        assert stats.num_blocks == 20 and stats.num_preemptions > 0
        assert stats.num_free_blocks == stats.num_blocks  # every block back (the only block table is rank 0's)
        assert_same_greedy(tp1, tp2, tiny_models[family], prompts, 12)
    finally:
        two.shutdown()
    assert ranks_gone(two.engine)


@pytest.fixture(scope="module")
def tp_pair(tiny_models):
    """TP=1 and TP=2 engines on the tiny Llama with the prefix cache, int8 weights (groups of 32, which
    every shard boundary respects, so both quantize alike) and an int8 KV cache."""
    common = dict(dtype="float32", device="cpu", block_size=BS, quantization="iq-int8", group_size=32,
                  kv_cache_dtype="int8")
    one = LLM(str(tiny_models["llama"]), **common)
    two = LLM(str(tiny_models["llama"]), tensor_parallel_size=2, **common)
    yield one, two
    two.shutdown()


def test_tp2_quantized_sampling_n_guided_and_prefix_cache(tp_pair, tiny_models):
    one, two = tp_pair
    prompts = mixed_prompts(8, max_len=60, seed=5)
    greedy = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert_same_greedy(one.generate(prompts, greedy), two.generate(prompts, greedy), tiny_models["llama"], prompts, 10)

    # Seeded sampling, n = 3: reproducible, and the same draws as one rank (the sampler runs on rank 0).
    sampled = SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=11, n=3, ignore_eos=True)
    first, again = two.generate(prompts[:4], sampled), two.generate(prompts[:4], sampled)
    alone = one.generate(prompts[:4], sampled)
    ids = lambda outs: [[c.token_ids for c in o.outputs] for o in outs]  # noqa: E731
    assert ids(first) == ids(again) == ids(alone)
    assert all(len(o.outputs) == 3 for o in first)

    # The prefix cache: a repeated prompt starts from its cached blocks, with the same output.
    long_prompt = mixed_prompts(1, min_len=70, max_len=70, seed=9)[0]
    cold, warm = two.generate([long_prompt], greedy)[0], two.generate([long_prompt], greedy)[0]
    assert warm.num_cached_tokens >= 64 and warm.outputs[0].token_ids == cold.outputs[0].token_ids

    # Guided decoding (its masks apply on rank 0, before sampling).
    guided = two.generate(["Pick a number:"], SamplingParams(max_tokens=12, temperature=0.8, seed=1,
                                                             regex="[0-9]{3}"))[0]
    assert re.fullmatch("[0-9]{3}", guided.outputs[0].text), guided.outputs[0].text

    stats = two.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_bad_tensor_parallel_settings_are_refused_before_any_rank_starts(tiny_models, monkeypatch):
    path = str(tiny_models["llama"])  # 4 heads, 2 KV heads, intermediate 128, vocab 49152
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size.*intermediate_size"):
        LLM(path, device="cpu", tensor_parallel_size=3)
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size.*KV heads"):
        LLM(path, device="cpu", tensor_parallel_size=8)  # 2 KV heads, 4 query heads: 8 ranks cannot split them
    from dashinfer_core.distributed import launcher
    monkeypatch.setattr(launcher, "available_cores", lambda: [0, 1])
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size: 4 CPU ranks need at least 4 cores"):
        LLM(path, device="cpu", tensor_parallel_size=4)
    with pytest.raises(InvalidParameterError, match="cpu_threads_bind"):
        EngineConfig(tensor_parallel_size=2, cpu_threads_bind="0")
    with pytest.raises(InvalidParameterError, match="cpu_threads_bind"):
        LLM(path, device="cpu", tensor_parallel_size=2, cpu_threads_bind="0|7")  # core 7 is not ours
    with pytest.raises(InvalidParameterError, match="tensor_parallel_size"):
        EngineConfig(tensor_parallel_size=0)


def test_a_rank_that_dies_ends_the_engine_and_leaves_no_process(tiny_models):
    shm_before = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()

    async def run():
        engine = AsyncEngine(EngineConfig(model=str(tiny_models["llama"]), dtype="float32", device="cpu",
                                          tensor_parallel_size=2))
        rank1 = engine.engine.runner.ranks.processes[0]

        async def one(i):
            try:
                async for _ in engine.generate([100 + i] * 10, SamplingParams(max_tokens=500, ignore_eos=True)):
                    pass
                return "finished"
            except EngineDeadError:
                return "dead"

        tasks = [asyncio.create_task(one(i)) for i in range(4)]
        await asyncio.sleep(1.0)
        killed = time.monotonic()
        os.kill(rank1.pid, signal.SIGKILL)
        results = await asyncio.wait_for(asyncio.gather(*tasks), 60)
        ended_after = time.monotonic() - killed
        engine.shutdown()
        return engine, results, ended_after

    engine, results, ended_after = asyncio.run(run())
    assert results == ["dead"] * 4 and not engine.is_running
    assert isinstance(engine.dead_reason, EngineDeadError) and "rank 1" in str(engine.dead_reason)
    assert ended_after < 30
    assert ranks_gone(engine.engine)
    if shm_before or os.path.isdir("/dev/shm"):
        assert set(os.listdir("/dev/shm")) <= shm_before  # no shared-memory segment left behind


def test_ranks_joined_through_env_rendezvous_like_torchrun(tiny_models, tmp_path):
    """Rank 1 started on its own (as torchrun or a cluster scheduler would), rank 0 the CLI."""
    path = str(tiny_models["llama"])
    flags = ["--model", path, "--dtype", "float32", "--device", "cpu", "--tensor-parallel-size", "2",
             "--distributed-init-method", "env://"]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE="2",
               OMP_NUM_THREADS="1")
    rank1 = subprocess.Popen([sys.executable, "-m", "dashinfer_core.distributed.rank_worker", *flags],
                             env={**env, "RANK": "1"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    rank0 = subprocess.run([sys.executable, "-m", "dashinfer_core.cli", "generate", *flags, "--max-tokens", "8",
                            "--ignore-eos", "The capital of France is"], env={**env, "RANK": "0"},
                           capture_output=True, text=True, timeout=240)
    try:
        assert rank0.returncode == 0, rank0.stderr[-3000:]
        assert rank1.wait(60) == 0, rank1.stdout.read()[-3000:]
    finally:
        if rank1.poll() is None:
            rank1.kill()
    want = LLM(path, dtype="float32", device="cpu").generate(
        ["The capital of France is"], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0].outputs[0].text
    assert rank0.stdout.strip() == want.strip()


def children_running(pid: int, module: str) -> list[int]:
    """Processes whose parent is `pid` and whose command line names `module`."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except (OSError, ValueError, IndexError):
            continue
        if ppid == pid and module in cmdline:
            found.append(int(entry))
    return found


CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.mark.slow
def test_fastchat_worker_with_two_ranks_through_the_openai_client(tmp_path, default_model_dir):
    """The embedded model (9 heads, 3 KV heads: 2 and 1 per rank) behind FastChat's controller and
    OpenAI server; then a rank is killed: the worker exits non-zero and the controller drops it."""
    import requests
    from openai import OpenAI

    from servers import start_fastchat_stack, wait_until
    want = LLM(device="cpu", dtype="float32").chat([CAPITAL], SamplingParams(max_tokens=32, temperature=0.0))[0].text
    model = "SmolLM2-135M-Instruct"
    stack = start_fastchat_stack(tmp_path, ["--num-gpus", "2", "--dtype", "float32", "--device", "cpu",
                                            "--max-model-len", "1024"], {model},
                                 {"FASTCHAT_CONTROLLER_HEART_BEAT_EXPIRATION": "6",
                                  "FASTCHAT_WORKER_HEART_BEAT_INTERVAL": "2"})
    worker = stack["worker_proc"]
    try:
        client = OpenAI(base_url=stack["api"], api_key="unused", max_retries=0, timeout=120)
        r = client.chat.completions.create(model=model, messages=CAPITAL, temperature=0, max_tokens=32)
        assert r.choices[0].message.content == want
        ranks = children_running(worker.proc.pid, "dashinfer_core.distributed.rank_worker")
        assert len(ranks) == 1, worker.tail()
        os.kill(ranks[0], signal.SIGKILL)
        wait_until(lambda: not worker.alive(), 60, "the worker to exit", [])
        assert worker.proc.returncode not in (0, None), worker.tail()
        wait_until(lambda: model not in requests.post(f"{stack['controller']}/list_models", timeout=2)
                   .json()["models"], 60, "the controller to drop the worker", [])
    finally:
        for p in reversed(stack["procs"]):
            p.stop()


def test_litellm_sdk_passes_tensor_parallel_size_to_the_engine(default_model_dir):
    import litellm

    import dashinfer_litellm
    from dashinfer_litellm import provider
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    dashinfer_litellm.register()
    want = LLM(device="cpu", dtype="float32").chat([CAPITAL], SamplingParams(max_tokens=32, temperature=0.0))[0].text
    try:
        r = litellm.completion(model="dashinfer/default", messages=CAPITAL, temperature=0, max_tokens=32,
                               tensor_parallel_size=2, dtype="float32", device="cpu")
        assert r.choices[0].message.content == want
        engines = [e for e in provider._engines.values() if e.engine.config.tensor_parallel_size == 2]
        assert len(engines) == 1 and engines[0].engine.runner.ranks is not None
    finally:
        for key, engine in list(provider._engines.items()):
            if engine.engine.config.tensor_parallel_size == 2:
                engine.shutdown()
                del provider._engines[key]


def process_gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")  # exited (a zombie until reaped)
    except OSError:
        return True


def test_ranks_exit_when_rank_0_is_killed(tiny_models):
    script = ("import time; from dashinfer_core import LLM; "
              f"llm = LLM({str(tiny_models['llama'])!r}, device='cpu', dtype='float32', tensor_parallel_size=2); "
              "print('ready', flush=True); time.sleep(300)")
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.stdout.readline().strip() == "ready"
        ranks = children_running(driver.pid, "dashinfer_core.distributed.rank_worker")
        assert len(ranks) == 1
        driver.kill()
        driver.wait(10)
        deadline = time.monotonic() + 20
        while not process_gone(ranks[0]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert process_gone(ranks[0]), "the rank outlived rank 0"
    finally:
        if driver.poll() is None:
            driver.kill()


def test_tp2_with_the_triton_kernels(tiny_models):
    """The Triton attention kernels under tensor parallel (interpreted on the CPU, as every kernel test)."""
    prompts = mixed_prompts(4, max_len=40, seed=7)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    common = dict(dtype="float32", device="cpu", block_size=BS)
    want = LLM(str(tiny_models["qwen3"]), attention_backend="torch", **common).generate(prompts, params)
    two = LLM(str(tiny_models["qwen3"]), attention_backend="triton", tensor_parallel_size=2, **common)
    try:
        assert two.engine.runner.attention.name == "triton"
        assert_same_greedy(want, two.generate(prompts, params), tiny_models["qwen3"], prompts, 6)
    finally:
        two.shutdown()
