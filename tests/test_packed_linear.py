"""bf16 and fp32 weights packed once into oneDNN's layout (the packed_linear fast path): the same products as the
plain weights, eagerly and inside compiled graphs, with no plain copy left behind; in fp32 the very same scores.
Machines where oneDNN cannot prepack bf16 (AVX2-only) run the plain route, which every other bf16 test covers;
the AVX2 run in test_capabilities checks that the path is off there for bf16 and on for fp32."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from dashinfer_core import capabilities
from dashinfer_core.layers import linear as linear_mod
from dashinfer_core.layers.linear import Linear

needs_packing = pytest.mark.skipif(not capabilities.packed_linear_works(),
                                   reason="oneDNN cannot prepack bf16 weights on this CPU (plain route: other tests)")


def _layer(bias: bool) -> Linear:
    layer = Linear(64, 96, bias=bias, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    layer.weight.data.copy_(torch.randn(96, 64, generator=gen) * 0.2)
    if bias:
        layer.bias.data.copy_(torch.randn(96, generator=gen))
    return layer


@needs_packing
@pytest.mark.parametrize("bias", [False, True])
def test_packed_layer_gives_the_plain_product_and_keeps_no_plain_copy(bias):
    layer = _layer(bias)
    plain_weight = layer.weight.detach().clone()
    inputs = [torch.randn(rows, 64, generator=torch.Generator().manual_seed(rows)).bfloat16() for rows in (1, 5, 64)]
    want = [F.linear(x.float(), plain_weight.float(), None if layer.bias is None else layer.bias.float())
            for x in inputs]
    layer.pack()
    assert layer.packed and layer.weight.stride() == (0, 0) and layer.weight.shape == (96, 64)
    assert layer.weight.untyped_storage().nbytes() <= 2  # the placeholder: one element
    for x, w in zip(inputs, want):
        torch.testing.assert_close(layer(x).float(), w, atol=0.05, rtol=0.02)

    # Inside a compiled graph the product is the opaque custom op, on the same packed weight.
    compiled = torch.compile(lambda x: layer(x) * 2.0, dynamic=True)
    for x in inputs[1:]:
        torch.testing.assert_close(compiled(x), layer(x) * 2.0)


@needs_packing
def test_a_placeholder_without_its_packed_weight_raises_and_entries_go_with_their_layer():
    layer = _layer(False)
    layer.pack()
    x = torch.randn(3, 64).bfloat16()
    stray = linear_mod.placeholder_of(layer.weight)  # a placeholder nothing was packed for
    with pytest.raises(RuntimeError, match="no packed weight"):
        linear_mod.packed_linear(x, stray)
    gc.collect()  # garbage of earlier tests first: their entries would go in the same collection
    before = len(linear_mod._PACKED)
    del layer
    gc.collect()
    assert len(linear_mod._PACKED) == before - 1


@needs_packing
def test_engine_packs_its_bf16_projections_and_untied_head(tiny_models, monkeypatch):
    """A bf16 engine packs every projection and the untied LM head and scores text as the plain route does:
    both are measured against the fp32 model's scores, and the packed route may not stray much further from
    them than the plain bf16 route does (the two accumulate in different orders, and by how much depends on
    the CPU: a fixed packed-vs-plain bound held on one machine and not on another). With the path disabled
    nothing is packed."""
    from dashinfer_core import LLM
    ids = list(range(5, 69))
    runs = {}
    for dtype, disable in (("bfloat16", ""), ("bfloat16", "packed_linear"), ("float32", "")):
        monkeypatch.setenv("DASHINFER_DISABLE", disable)
        llm = LLM(str(tiny_models["llama"]), dtype=dtype, device="cpu", kv_cache_memory=8 << 20)
        model = llm.engine.runner.model
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        runs[dtype, disable] = llm.score(ids, chunk_tokens=24), [m.packed for m in linears], model.packed_head, \
            llm.engine.stats().fast_paths["packed_linear"]
    (packed_scores, packed_flags, packed_head, on), (plain_scores, plain_flags, plain_head, off), \
        (fp32_scores, fp32_flags, fp32_head, _) = runs.values()
    assert on.startswith("on") and off.startswith("off") and "DASHINFER_DISABLE" in off
    assert packed_flags and all(packed_flags) and packed_head
    assert not any(plain_flags) and not plain_head
    assert fp32_head == capabilities.packed_linear_works(torch.float32)  # fp32: its own test below
    reference = torch.tensor(fp32_scores)
    packed_err = (torch.tensor(packed_scores) - reference).abs()
    plain_err = (torch.tensor(plain_scores) - reference).abs()
    assert float(plain_err.mean()) > 0  # bf16 rounding shows, so the comparison below measures something
    assert float(packed_err.mean()) <= 2 * float(plain_err.mean()) + 0.01, (packed_err, plain_err)
    assert float(packed_err.max()) <= 2 * float(plain_err.max()) + 0.05, (packed_err, plain_err)


@pytest.mark.skipif(not capabilities.packed_linear_works(torch.float32),
                    reason="oneDNN's packed fp32 product is not the plain one's bit for bit here (fp32 stays plain)")
def test_an_fp32_engine_packs_its_weights_and_scores_exactly_as_the_plain_route(tiny_models, monkeypatch):
    """fp32 weights are packed only where oneDNN's product on them is bit for bit the plain weight's at several
    rows, so packing moves no prefill score (the 24-token chunks run at 24 rows): the same floats, not close ones.
    (The tiny model's projections are all small enough for MKL's route: here every size is packed.)"""
    from dashinfer_core import LLM
    monkeypatch.setattr(linear_mod, "SMALL_FP32_WEIGHT", 0)
    ids = list(range(5, 69))
    runs = []
    for disable in ("", "packed_linear"):
        monkeypatch.setenv("DASHINFER_DISABLE", disable)
        llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", kv_cache_memory=8 << 20)
        model = llm.engine.runner.model
        flags = [m.packed for m in model.modules() if isinstance(m, Linear)]
        runs.append((llm.score(ids, chunk_tokens=24), flags, model.packed_head,
                     llm.engine.stats().fast_paths["packed_linear"]))
    (packed_scores, packed_flags, packed_head, on), (plain_scores, plain_flags, plain_head, off) = runs
    assert on.startswith("on") and "float32" in on and off.startswith("off")
    assert packed_flags and all(packed_flags) and packed_head
    assert not any(plain_flags) and not plain_head
    assert packed_scores == plain_scores


@pytest.mark.skipif(not capabilities.packed_linear_works(torch.float32),
                    reason="fp32 weights are not packed on this CPU, small or not")
def test_small_fp32_weights_stay_plain_for_mkl_and_give_its_product(tiny_models, monkeypatch):
    """Packing leaves fp32 weights of up to SMALL_FP32_WEIGHT elements plain, run by F.linear (oneDNN's fixed cost
    per call is most of such a product), and packs the rest: each small layer gives F.linear's product on its own
    weight bit for bit, at one row and several, and the engine's scores are the all-packed engine's."""
    from dashinfer_core import LLM
    ids = list(range(5, 69))
    runs = []
    limit = linear_mod.SMALL_FP32_WEIGHT
    for threshold in (limit, 0):
        monkeypatch.setattr(linear_mod, "SMALL_FP32_WEIGHT", threshold)
        llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", kv_cache_memory=8 << 20)
        model = llm.engine.runner.model
        linears = [m for m in model.modules() if isinstance(m, Linear)]
        runs.append((llm.score(ids, chunk_tokens=24), linears, model.packed_head))
    (small_scores, small_linears, small_head), (packed_scores, packed_linears, _) = runs
    assert limit >= max(m.weight.numel() for m in small_linears)  # the tiny model: all small
    assert all(m.mkl_small and not m.packed and m.weight.stride(-1) == 1 for m in small_linears)
    assert small_head  # the LM head (49,152 x 64) is well past the limit: packed
    assert all(m.packed and not m.mkl_small for m in packed_linears)
    assert small_scores == packed_scores
    gen = torch.Generator().manual_seed(1)
    for layer in small_linears[:3]:
        for rows in (1, 7):
            x = torch.randn(rows, layer.in_features, generator=gen)
            assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    monkeypatch.setattr(linear_mod, "SMALL_FP32_WEIGHT", limit)
    big = Linear(256, 128, bias=False, dtype=torch.float32)  # 32,768 elements: packed
    big.pack()
    assert big.packed and not big.mkl_small
