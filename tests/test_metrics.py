"""dashinfer_core.metrics in process: counts and latencies from an AsyncEngine's outputs, an aborted
stream counted as such and forgotten, gauges read from the engine. The servers' /metrics run
test_openai_fields.check_metrics."""
from __future__ import annotations

import asyncio

from dashinfer_core import SamplingParams
from dashinfer_core.engine.async_engine import AsyncEngine
from dashinfer_core.metrics import Metrics
from test_openai_fields import metric_samples


def test_counters_histograms_and_gauges(tiny_models):
    engine = AsyncEngine(model=str(tiny_models["llama"]), dtype="float32")
    metrics = Metrics()
    metrics.attach(engine, "tiny")
    observer = engine._observer.__self__

    async def main():
        async def full():
            async for out in engine.generate([5, 6, 7], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)):
                last = out
            return last

        async def cut():
            async for out in engine.generate([9, 10], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)):
                if len(out.outputs[0].token_ids) >= 3:
                    break  # the stream closes: the request is aborted

        await asyncio.gather(full(), cut())
        for _ in range(100):  # the abort is delivered by the step loop
            if not observer.last_token_time:
                break
            await asyncio.sleep(0.02)

    try:
        asyncio.run(main())
        text = metrics.exposition()[0].decode()
    finally:
        engine.shutdown()
    got = metric_samples(text, "tiny")
    assert got["dashinfer:prompt_tokens_total"] == 5
    assert got["dashinfer:generation_tokens_total"] >= 8 + 3
    assert got["dashinfer:time_to_first_token_seconds_count"] == 2
    assert got["dashinfer:request_success_total[finished_reason=length]"] == 1
    assert got["dashinfer:request_success_total[finished_reason=abort]"] == 1
    assert got["dashinfer:inter_token_latency_seconds_count"] == got["dashinfer:generation_tokens_total"] - 2
    assert got["dashinfer:num_requests_running"] == 0 and got["dashinfer:kv_cache_usage_perc"] == 0
    assert observer.last_token_time == {}  # nothing kept for ended requests
