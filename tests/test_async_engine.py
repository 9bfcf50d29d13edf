"""AsyncEngine: per-request streams from the background step loop."""
from __future__ import annotations

import asyncio
import time

import pytest

from dashinfer_core import AsyncEngine, DuplicateRequestError, EngineDeadError, InvalidParameterError, SamplingParams
from dashinfer_core.llm import apply_chat_template

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(dtype="float32", device="cpu", block_size=16, max_num_seqs=16)
    yield eng
    eng.shutdown()


def wait_until_idle(engine, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stats = engine.get_stats()
        if stats.num_requests == 0 and stats.num_free_blocks == stats.num_blocks:
            return stats
        time.sleep(0.02)
    raise AssertionError(f"engine not idle: {engine.get_stats()}")


async def collect(engine, prompt, params, request_id=None):
    deltas, last = [], None
    async for out in engine.generate(prompt, params, request_id=request_id):
        deltas.append(out.outputs[0].delta_text)
        last = out
    return deltas, last


def test_stream_deltas_concatenate_to_final_text(engine):
    prompt = apply_chat_template(engine.tokenizer, CAPITAL)
    deltas, last = asyncio.run(collect(engine, prompt, SamplingParams(max_tokens=32, temperature=0.0)))
    assert len(deltas) > 3
    assert "".join(deltas) == last.text == "The capital of France is Paris."
    assert last.finished and last.finish_reason == "stop"
    wait_until_idle(engine)


def test_stream_holds_back_partial_stop_strings(engine):
    prompt = apply_chat_template(engine.tokenizer, CAPITAL)
    params = SamplingParams(max_tokens=32, temperature=0.0, stop=["is Paris"])
    deltas, last = asyncio.run(collect(engine, prompt, params))
    assert "".join(deltas) == last.text == "The capital of France "
    assert all("is" not in d for d in deltas[-2:])


def test_concurrent_streams_match_single_runs(engine):
    prompts = [f"Count from {i} to {i + 5}:" for i in range(8)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def main():
        together = await asyncio.gather(*(collect(engine, p, params) for p in prompts))
        alone = [await collect(engine, p, params) for p in prompts[:3]]
        return together, alone

    together, alone = asyncio.run(main())
    for (deltas, last), (_, single) in zip(together, alone):
        assert "".join(deltas) == last.text
        assert last.token_ids == single.token_ids
    wait_until_idle(engine)


def test_abort_mid_stream_frees_blocks(engine):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        seen = []
        async for out in engine.generate("Tell me a long story.", params, request_id="to-abort"):
            seen.append(out)
            if len(seen) == 3:
                engine.abort("to-abort")
        return seen

    seen = asyncio.run(main())
    assert seen[-1].finished and seen[-1].finish_reason == "abort"
    assert len(seen[-1].token_ids) < 200
    wait_until_idle(engine)


def test_closing_the_stream_aborts_the_request(engine):
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)

    async def main():
        stream = engine.generate("Tell me another long story.", params, request_id="closed")
        async for _ in stream:
            break
        await stream.aclose()  # what a server does when its client disconnects

    asyncio.run(main())
    wait_until_idle(engine)
    assert engine.get_request_status("closed") is None


def test_cancelled_task_aborts_the_request(engine):
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)

    async def main():
        task = asyncio.create_task(collect(engine, "Once more, a story.", params, request_id="cancelled"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    wait_until_idle(engine)


def test_duplicate_id_and_bad_input_raise_before_queueing(engine):
    params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)

    async def main():
        first = engine.generate("Hello there", params, request_id="dup")
        first_out = await first.__anext__()
        with pytest.raises(DuplicateRequestError, match="request_id"):
            await engine.generate("Hello again", params, request_id="dup").__anext__()
        with pytest.raises(InvalidParameterError, match="prompt"):
            await engine.generate("", params).__anext__()
        assert engine.get_request_status("dup") == "running"
        await first.aclose()
        return first_out

    assert not asyncio.run(main()).finished
    wait_until_idle(engine)


def test_step_loop_crash_fails_pending_streams():
    eng = AsyncEngine(dtype="float32", device="cpu", block_size=16)

    def broken_step():
        raise RuntimeError("simulated kernel failure")

    eng.engine.step = broken_step

    async def main():
        with pytest.raises(EngineDeadError, match="simulated kernel failure"):
            await collect(eng, "Hi", SamplingParams(max_tokens=4))
        with pytest.raises(EngineDeadError):
            await collect(eng, "Hi again", SamplingParams(max_tokens=4))

    asyncio.run(main())
    assert not eng.is_running


def test_a_failed_start_raises_in_the_caller_and_leaves_no_loop(tmp_path):
    """The engine is built on the step-loop thread; what fails there is raised by the constructor."""
    import threading
    from dashinfer_core import InvalidParameterError
    before = {t.name for t in threading.enumerate()}
    with pytest.raises(InvalidParameterError, match="kv_cache_memory"):
        AsyncEngine(dtype="float32", device="cpu", kv_cache_memory=1)
    assert "dashinfer-step-loop" not in {t.name for t in threading.enumerate()} - before


WARM_UP_PROBE = r"""
import asyncio, sys
from torch._dynamo.utils import counters
from dashinfer_core import AsyncEngine, SamplingParams
async def one(engine, prompt, n):
    async for out in engine.generate(prompt, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True)):
        pass
async def first_requests(engine):
    await one(engine, [5, 6, 7], 4)  # a short prompt (the decode path), then one decode at a time
    await one(engine, list(range(3, 40)), 3)  # a longer one
    first = asyncio.create_task(one(engine, list(range(50, 90)), 8))
    await asyncio.sleep(0.3)
    await asyncio.gather(first, one(engine, list(range(90, 120)), 4))  # two decoding, one beside a prompt
for dtype in ("float32", "bfloat16"):
    before = counters["stats"]["unique_graphs"]
    engine = AsyncEngine(model=sys.argv[1], dtype=dtype, device="cpu", block_size=16)
    warm = counters["stats"]["unique_graphs"]
    asyncio.run(first_requests(engine))
    compiled = engine.get_stats().fast_paths["compiled_attention"].split(":")[0]
    print(dtype, compiled, warm - before, counters["stats"]["unique_graphs"] - warm)
    engine.shutdown()
"""


def test_start_up_builds_the_compiled_graphs_the_first_requests_need(tiny_models):
    """AsyncEngine (what the servers run) warms up before its constructor returns: in a fresh process the
    first requests, one alone, then two at once beside a prompt, compile nothing more (they would wait
    seconds for it), in float32 (attention compiled) and bfloat16 (the layers too)."""
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-c", WARM_UP_PROBE, str(tiny_models["llama"])],
                         env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [line.split() for line in out.stdout.splitlines()[-2:]]
    assert [line[0] for line in lines] == ["float32", "bfloat16"], out.stdout
    for dtype, compiled, built_at_start, built_after in lines:
        assert int(built_after) == 0, out.stdout
        assert (int(built_at_start) > 0) == (compiled == "on"), out.stdout  # the warm-up built them


POOL_PROBE = r"""
import os, threading, torch
from dashinfer_core.engine.openmp_pool import release_thread_pool
torch.set_num_threads(2)
tasks = lambda: len(os.listdir("/proc/self/task"))
libgomp = "libgomp" in open("/proc/self/maps").read()
a = torch.randn(256, 256)
before = tasks()
a @ a  # the first parallel region of this thread: its pool starts a worker
with_pool = tasks()
released = release_thread_pool()
after = tasks()
a @ a  # a new pool, for the next region
print(libgomp, before, with_pool, released, after, tasks())
"""


def test_release_thread_pool_frees_the_calling_threads_openmp_workers():
    """AsyncEngine's caller may have run parallel ops; its idle libgomp pool must go (openmp_pool.py)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", POOL_PROBE], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    libgomp, before, with_pool, released, after, again = out.stdout.split()
    before, with_pool, after, again = int(before), int(with_pool), int(after), int(again)
    if libgomp == "False":  # another OpenMP runtime: nothing is touched
        assert released == "False"
        return
    assert with_pool > before and released == "True"
    assert after == before and again == with_pool


def test_the_engine_frees_the_callers_pool_before_its_step_loop_starts(monkeypatch):
    import threading
    from dashinfer_core.engine import async_engine
    calls = []
    monkeypatch.setattr(async_engine, "release_thread_pool", lambda: calls.append(threading.get_ident()))
    with pytest.raises(InvalidParameterError, match="kv_cache_memory"):
        AsyncEngine(dtype="float32", device="cpu", kv_cache_memory=1)
    assert calls == [threading.get_ident()]


def test_request_stream_keeps_order_and_outlives_a_cancelled_reader():
    """The per-request stream the step thread fills: items come out in order, a reader waiting on an empty
    stream wakes at the next put, and a reader cancelled while waiting leaves the stream usable."""
    from dashinfer_core.engine.async_engine import _Stream

    async def main():
        stream = _Stream(asyncio.get_running_loop())
        stream.put(1)
        stream.put(2)
        assert [await stream.get(), await stream.get()] == [1, 2]
        reader = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        assert not reader.done()
        stream.put(3)
        assert await reader == 3
        cancelled = asyncio.ensure_future(stream.get())
        await asyncio.sleep(0)
        cancelled.cancel()
        await asyncio.sleep(0)
        stream.put(4)  # the cancelled reader's waiter is done: not woken again, the item is kept
        stream.put(ValueError("x"))
        assert await stream.get() == 4 and isinstance(await stream.get(), ValueError)

    asyncio.run(main())
