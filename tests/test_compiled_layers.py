"""CPU half precision runs the decoder layers' work around attention (and, in decode-only steps, the
attention too) as torch.compile'd graphs (models/compiled.py); fp32 and enforce_eager stay eager. The compiled layers must give what the
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


def test_decode_steps_with_attention_in_the_graphs_match_the_steps_without(monkeypatch):
    """A step of decodes only (one attention bucket) runs its attention inside the compiled graphs. The two
    routes are different bf16 graphs (inductor sums the norms in another order; in a long test process either
    may be past dynamo's recompile limit and run eagerly). The first decode step reads the same prefilled
    cache on both routes: its log-probabilities agree closely. Later each route reads the K/V it wrote itself,
    so the rounding differences compound: a sequence may part ways, but only where the two best tokens were
    close for both routes (batch 1 and 3)."""
    import dashinfer_core.models.compiled as compiled_module
    llm = LLM(dtype="bfloat16", device="cpu")
    parts = llm.engine.runner.model.compiled_parts
    in_graph_steps = []
    bucket_of = compiled_module.decode_bucket
    monkeypatch.setattr(compiled_module, "decode_bucket", lambda ctx: in_graph_steps.append(bucket_of(ctx)) or
                        in_graph_steps[-1])
    prompts = ["The old lighthouse keeper", "Water boils at", PROSE[:600]]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True, logprobs=5)
    two = Counting(parts.graphs.decode_two)
    monkeypatch.setattr(parts.graphs, "decode_two", two)
    got = {}
    # In the graphs two layers a graph (the middle layer's K/V stored inside it), or one; outside the graphs.
    for route, in_graph, two_layers in (("two", True, True), ("one", True, False), ("out", False, True)):
        parts.decode_in_graph, parts.two_layers_a_graph = in_graph, two_layers
        got[route] = [llm.generate(p, params) for p in (prompts[:1], prompts)]
    parts.two_layers_a_graph = True
    assert any(b is not None for b in in_graph_steps) and not parts.failed
    assert two.calls and two.active  # the two-layer graphs ran, compiled
    pairs = list(zip(got["two"][0] + got["two"][1], got["out"][0] + got["out"][1])) + \
        list(zip(got["one"][0] + got["one"][1], got["out"][0] + got["out"][1]))
    for a, b in pairs:
        a, b = a.outputs[0], b.outputs[0]
        assert a.token_ids[0] == b.token_ids[0]  # from the prefill, the same on both routes
        if a.token_ids[1] == b.token_ids[1]:  # the first decode step, from the same cache
            first = a.token_ids[1]
            assert abs(a.logprobs[1][first] - b.logprobs[1][first]) < 0.15, (a.logprobs[1], b.logprobs[1])
        part = next((j for j, (x, y) in enumerate(zip(a.token_ids, b.token_ids)) if x != y), None)
        if part is not None:
            for out, other in ((a, b), (b, a)):
                top = out.logprobs[part]
                gap = top[out.token_ids[part]] - top.get(other.token_ids[part], float("-inf"))
                assert gap < (0.2 if part == 1 else 0.5), (part, gap, top)


class Counting:
    """A compiled part that counts its calls (its other attributes: the part's)."""

    def __init__(self, part):
        self.part, self.calls = part, 0

    def __call__(self, *args):
        self.calls += 1
        return self.part(*args)

    def __getattr__(self, name):
        return getattr(self.part, name)


def test_fp32_stays_eager(default_model_dir):
    assert LLM(dtype="float32", device="cpu").engine.runner.model.compiled_parts is None


def test_compiled_graphs_skip_the_wrappers_repeated_size_checks():
    """compile_or_eager builds inductor's wrapper without its per-call size and stride checks (dynamo's guards
    made them before the call; ~50 of them in a two-layer decode graph); a plain torch.compile keeps them."""
    from torch._inductor.utils import run_and_get_code

    from dashinfer_core.compiling import compile_or_eager

    def product(x, w):
        return torch.nn.functional.linear(x.relu(), w) * 2

    x, w = torch.randn(3, 8), torch.randn(4, 8)
    codes = {}
    with torch._inductor.config.patch(force_disable_caches=True):
        for name, compiled in (("ours", compile_or_eager(product, name="product", dynamic=False)),
                               ("plain", torch.compile(lambda x, w: product(x, w), dynamic=False))):
            out, source = run_and_get_code(compiled, x, w)
            torch.testing.assert_close(out, product(x, w))
            codes[name] = "\n".join(source)
    assert "assert_size_stride(" in codes["plain"]
    assert "assert_size_stride(" not in codes["ours"] and "def call(" in codes["ours"]


def test_graphs_are_kept_per_model_structure():
    """The layer graphs skip dynamo's guards on the modules they are given, so models share a set of graphs only
    when their structure (classes, plain attributes, tensor dtypes/shapes/strides) is the same; a model whose
    layers differ from each other keeps the guarded graphs."""
    from torch import nn

    from dashinfer_core.models.compiled import GUARDED, graphs_for, structure_signature

    def model(width=8, eps=1e-6, dtype=torch.float32):
        norm = nn.LayerNorm(width, eps=eps).to(dtype)
        return [nn.Linear(width, width).to(dtype) for _ in range(3)], norm, nn.Identity()

    a, b = graphs_for(*model()), graphs_for(*model())
    assert a is b and a is not GUARDED  # same structure, other weights: one set of graphs
    for other in (model(width=16), model(eps=1e-5), model(dtype=torch.bfloat16)):
        assert graphs_for(*other) not in (a, GUARDED)
    layers, norm, rotary = model()
    layers[1] = nn.Linear(8, 8, bias=False)
    assert graphs_for(layers, norm, rotary) is GUARDED
    # A copy per structure: new code objects, so dynamo keeps their caches apart
    assert a.decode_two.fn.__code__ is not GUARDED.decode_two.fn.__code__
    assert a.decode_two.fallback is GUARDED.decode_two  # (a part with a graph break falls back to its guarded form)
    linear = nn.Linear(4, 4)
    before = structure_signature(linear)
    linear.weight = nn.Parameter(linear.weight.detach().t().contiguous().t())  # same shape, other strides
    assert structure_signature(linear) != before
