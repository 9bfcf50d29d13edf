"""Engine invariants under randomized load (hypothesis), and faults confined to their request."""
from __future__ import annotations

import functools
import random

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dashinfer_core import LLM, EngineConfig, LLMEngine, SamplingParams
from dashinfer_core.cache.kv_cache import bytes_per_block

BS = 16
BLOCK_BYTES = bytes_per_block(2, BS, 2, 16, torch.float32)  # the tiny llama's block
VALID_REASONS = {"stop", "length", "abort", "error"}
SHARED_PREFIXES = [[random.Random(i).randrange(17, 49000) for _ in range(40)] for i in range(3)]


@st.composite
def workloads(draw):
    requests = []
    for i in range(draw(st.integers(1, 9))):
        prefix = draw(st.sampled_from([[], *SHARED_PREFIXES]))
        tail = draw(st.lists(st.integers(17, 49000), min_size=1, max_size=30))
        greedy = draw(st.booleans())
        guided = draw(st.sampled_from([None, None, None, {"choice": ["alpha", "beta", "gamma delta"]},
                                       {"regex": r"[0-9]{2,4}"}]))
        params = dict(max_tokens=draw(st.integers(1, 10)), temperature=0.0 if greedy else draw(st.floats(0.3, 1.5)),
                      seed=draw(st.integers(0, 2**31)), n=draw(st.sampled_from([1, 1, 1, 2])),
                      top_k=draw(st.sampled_from([-1, 5, 50])), top_p=draw(st.sampled_from([1.0, 0.9])),
                      ignore_eos=True, **(guided or {}))
        requests.append(dict(id=f"r{i}", prompt=(prefix + tail)[:60], params=params,
                             priority=draw(st.integers(0, 2)),
                             abort_at=draw(st.sampled_from([None, None, None, 0, 1, 3, 6])),
                             guided=guided is not None))
    return dict(requests=requests, blocks=draw(st.integers(6, 24)), budget=draw(st.sampled_from([16, 48, 256])))


@functools.lru_cache(maxsize=1)
def alone_llm(model_dir) -> LLM:
    """One engine for every reference run (one request at a time, no prefix cache: as a fresh engine answers)."""
    return LLM(str(model_dir), dtype="float32", device="cpu", block_size=BS, enable_prefix_caching=False)


def run_alone(model_dir, prompt, params):
    return alone_llm(model_dir).generate([prompt], SamplingParams(**params))[0].token_ids


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                   HealthCheck.function_scoped_fixture])
@given(workload=workloads())
def test_random_load_keeps_every_invariant(tiny_models, workload):
    model_dir = tiny_models["llama"]
    engine = LLMEngine(EngineConfig(model=str(model_dir), dtype="float32", device="cpu", block_size=BS,
                                    kv_cache_memory=workload["blocks"] * BLOCK_BYTES,
                                    max_num_batched_tokens=workload["budget"], max_num_seqs=8))
    finished, step = {}, 0
    for r in workload["requests"]:
        engine.add_request(r["id"], r["prompt"], SamplingParams(**r["params"]), priority=r["priority"])
    while engine.has_unfinished_requests():
        for r in workload["requests"]:
            if r["abort_at"] == step and r["id"] in engine.requests:
                out = engine.abort_request(r["id"])
                assert r["id"] not in finished
                finished[r["id"]] = out
        engine.wait_for_work(1.0)
        for out in engine.step():
            if out.finished:
                assert out.request_id not in finished, "a request ended twice"
                finished[out.request_id] = out
        step += 1
        assert step < 2000, "no progress"
    # Every request ended exactly once, with a valid reason, and every block is free again.
    assert set(finished) == {r["id"] for r in workload["requests"]}
    stats = engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and not any(engine.scheduler.block_manager.ref_counts)
    for r in workload["requests"]:
        out = finished[r["id"]]
        assert out.error is None or out.finish_reason == "error"
        assert all(c.finish_reason in VALID_REASONS for c in out.outputs)
        assert len(out.outputs) == r["params"]["n"] or out.finish_reason in ("abort", "error")
        if r["abort_at"] is None:
            assert all(c.finish_reason in ("length", "stop") for c in out.outputs), out
        if r["abort_at"] is None and r["params"]["temperature"] == 0.0 and not r["guided"]:
            alone = run_alone(model_dir, r["prompt"], r["params"])
            assert all(c.token_ids == alone for c in out.outputs), (r, out)
    engine.shutdown()


def test_nan_logits_fail_only_their_request(tiny_models, monkeypatch):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=BS)
    model = llm.engine.runner.model
    original = model.compute_logits
    poisoned_prompt = [777] * 9

    # Poison the victim's logits row in the step that samples it.
    runner = llm.engine.runner
    original_execute = runner.execute

    def execute(batch, rows, pool=()):
        victim = [i for i, r in enumerate(rows) if r.seq.request.prompt_token_ids == poisoned_prompt]
        if victim:
            def poisoned(hidden):
                out = original(hidden)
                out[victim] = float("nan")
                return out
            model.compute_logits = poisoned
        try:
            return original_execute(batch, rows, pool)
        finally:
            model.compute_logits = original

    monkeypatch.setattr(runner, "execute", execute)
    prompts = [[100, 200, 300], poisoned_prompt, [400, 500]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True))
    assert outs[1].finish_reason == "error" and "non-finite" in outs[1].error
    assert [len(outs[0].token_ids), len(outs[2].token_ids)] == [5, 5] and outs[0].error is None
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_guided_fsm_error_fails_only_its_request(default_model_dir, monkeypatch):
    from dashinfer_core.guided.state import GuidedState
    llm = LLM(dtype="float32", device="cpu")
    original = GuidedState.advance

    def advance(self, token_id):
        if self.small_sets.index is victim_index[0]:
            raise RuntimeError("simulated FSM failure")
        return original(self, token_id)

    victim_index = [None]
    params_bad = SamplingParams(max_tokens=8, regex=r"[a-z]{3,5}!")
    params_ok = SamplingParams(max_tokens=8, regex=r"[0-9]{3}")
    victim_index[0] = llm.engine.guided.compiler.submit(params_bad.guided_spec.regex).result()
    monkeypatch.setattr(GuidedState, "advance", advance)
    outs = llm.generate(["Say a word:", "Say a number:", "Hello"],
                        [params_bad, params_ok, SamplingParams(max_tokens=4, temperature=0.0)])
    assert outs[0].finish_reason == "error" and "simulated FSM failure" in outs[0].error
    assert outs[1].error is None and len(outs[1].text) == 3 and outs[1].text.isdigit()
    assert outs[2].error is None and len(outs[2].token_ids) == 4


def test_a_failing_step_ends_its_batch_and_the_engine_goes_on(tiny_models, monkeypatch):
    llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=BS)
    runner = llm.engine.runner
    original = runner.execute
    calls = [0]

    def flaky(batch, rows, pool=()):
        calls[0] += 1
        if calls[0] == 2:
            raise RuntimeError("simulated out of memory")
        return original(batch, rows, pool)

    monkeypatch.setattr(runner, "execute", flaky)
    first = llm.generate([[10, 20, 30]], SamplingParams(max_tokens=6, temperature=0.0))[0]
    assert first.finish_reason == "error" and "simulated out of memory" in first.error
    second = llm.generate([[10, 20, 30]], SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))[0]
    assert second.error is None and len(second.token_ids) == 6
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks and stats.num_requests == 0
