"""CPU half precision runs each decoder layer's non-attention work as torch.compile'd graphs
(models/compiled.py); fp32 and enforce_eager stay eager. The compiled layers must give what the
eager ones give, on a real model (the embedded one), in prefill (score) and in decode (generate)."""
from __future__ import annotations

from pathlib import Path

import torch

from dashinfer_core import LLM, SamplingParams

PROSE = (Path(__file__).parent / "data" / "public_domain_prose.txt").read_text()


def test_bf16_compiled_layers_match_eager(default_model_dir):
    compiled = LLM(dtype="bfloat16", device="cpu")
    eager = LLM(dtype="bfloat16", device="cpu", enforce_eager=True)
    parts = compiled.engine.runner.model.compiled_parts
    assert parts is not None and eager.engine.runner.model.compiled_parts is None
    ids = compiled.get_tokenizer()(PROSE[:2000])["input_ids"][:96]
    got, want = torch.tensor(compiled.score(ids, chunk_tokens=40)), torch.tensor(eager.score(ids, chunk_tokens=40))
    assert not parts.failed  # the compiled graphs ran, no fallback
    # Both are bf16 approximations of the fp32 model and round in different places (inductor keeps
    # fused intermediates in fp32): the compiled one must be no further from fp32 than eager bf16 is
    # (~0.1 nat per token here); a wrong graph is off by whole nats.
    exact = torch.tensor(LLM(dtype="float32", device="cpu").score(ids, chunk_tokens=40))
    compiled_error, eager_error = (got - exact).abs().mean(), (want - exact).abs().mean()
    assert compiled_error < 1.5 * eager_error + 0.01, (compiled_error, eager_error)
    questions = [[{"role": "user", "content": q}] for q in ("How many days are in a week?", "What is 2 plus 2?")]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    outs = compiled.chat(questions, params)
    assert "7" in outs[0].text and "4" in outs[1].text, [o.text for o in outs]
    assert [o.text for o in outs] == [o.text for o in eager.chat(questions, params)]
    stats = compiled.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_fp32_stays_eager(default_model_dir):
    assert LLM(dtype="float32", device="cpu").engine.runner.model.compiled_parts is None
