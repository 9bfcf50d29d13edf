"""Embeddings from the generation engine (dashinfer_core.pooling): pooled final hidden states equal
HF's last_hidden_state pooled the same way, through chunked prefill and the prefix cache, batched with
generation; bad pooling input names the field; every KV block comes back. The server stacks run
test_openai_fields.check_embeddings."""
from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dashinfer_core import LLM, InvalidParameterError, SamplingParams
from dashinfer_core.engine.async_engine import AsyncEngine
from dashinfer_core.pooling import PoolingParams

TEXTS = ["The capital of France is Paris. " * 14, "Hello there", "A short one.", "word " * 40]


def hf_embeddings(model_dir, texts, pooling: str, normalize: bool = True) -> list[torch.Tensor]:
    hf = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    out = []
    for text in texts:
        with torch.no_grad():
            hidden = hf.model(torch.tensor([tok.encode(text)])).last_hidden_state[0]
        vector = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
        out.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    return out


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_pooled_hidden_states_equal_hf(tiny_models, family):
    # 64-token steps: the long prompts are prefilled in chunks; the prefix cache is on
    llm = LLM(str(tiny_models[family]), dtype="float32", max_num_batched_tokens=64, block_size=16,
              enable_prefix_caching=True)
    try:
        for pooling, normalize in (("last", True), ("mean", True), ("mean", False)):
            ref = hf_embeddings(tiny_models[family], TEXTS, pooling, normalize)
            for _ in range(2):  # the second time the "last" prompts start from cached blocks
                ours = llm.embed(TEXTS, pooling=pooling, normalize=normalize)
                for text, got, want in zip(TEXTS, ours, ref):
                    torch.testing.assert_close(torch.tensor(got), want, atol=2e-5, rtol=1e-4, msg=text[:20])
        stats = llm.engine.stats()
        assert stats.prefix_device_hit_tokens > 0  # the "last" runs did reuse the cache
        bm = llm.engine.scheduler.block_manager
        assert bm.num_free_blocks == bm.num_blocks
    finally:
        llm.shutdown()


def test_embeddings_batch_with_generation(tiny_models):
    """An embedding request joins the batches of a running generation; both come out as they do alone."""
    model = str(tiny_models["llama"])
    alone_llm = LLM(model, dtype="float32")
    want_text = alone_llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))[0]
    want_vec = alone_llm.embed(TEXTS[:2], pooling="mean")
    alone_llm.shutdown()
    engine = AsyncEngine(model=model, dtype="float32", max_num_batched_tokens=64)

    async def main():
        async def generate():
            last = None
            async for out in engine.generate([5, 6, 7, 8], SamplingParams(max_tokens=24, temperature=0,
                                                                          ignore_eos=True)):
                last = out
            return last

        task = asyncio.create_task(generate())
        await asyncio.sleep(0.05)
        vecs = await asyncio.gather(*(engine.embed(t, PoolingParams("mean")) for t in TEXTS[:2]))
        return await task, vecs

    try:
        text, vecs = asyncio.run(main())
        steps = engine.get_stats().num_steps
    finally:
        engine.shutdown()
    assert text.outputs[0].token_ids == want_text.outputs[0].token_ids
    for got, want in zip(vecs, want_vec):
        torch.testing.assert_close(torch.tensor(got.embedding), torch.tensor(want), atol=2e-5, rtol=1e-4)
        assert got.outputs[0].token_ids == [] and got.finished and len(got.prompt_token_ids) > 0
    assert steps < 24 + 8  # shared steps, not one run after the other


def test_bad_pooling_input_names_the_field(tiny_models):
    for kw, field in ((dict(pooling="max"), "pooling"), (dict(normalize="yes"), "normalize")):
        with pytest.raises(InvalidParameterError) as err:
            PoolingParams(**kw)
        assert err.value.field == field
    llm = LLM(str(tiny_models["llama"]), dtype="float32")
    try:
        with pytest.raises(InvalidParameterError) as err:
            llm.engine.build_request("x", [1, 2], SamplingParams(n=2), pooling=PoolingParams())
        assert err.value.field == "pooling"
        with pytest.raises(InvalidParameterError) as err:
            llm.embed([[1] * 5000])
        assert err.value.field == "prompt"
        assert len(llm.embed("hello", normalize=False)[0]) == 64  # one prompt: one vector of the hidden size
    finally:
        llm.shutdown()
