"""Quantization: packing, error bounds, quantized matmuls against dequantize-then-matmul, GPTQ loading,
and fluent greedy text from the embedded model in every mode (with no block leaks)."""
from __future__ import annotations

import pytest
import torch

from dashinfer_core import LLM, SamplingParams
from dashinfer_core.quant.linear import INT8PACK_MAX_ROWS, QuantizedLinear, a8w8_linear, to_signed_int8
from dashinfer_core.quant.weights import dequantize, pack_int4, quantize, unpack_int4


def test_int4_pack_round_trip():
    q = torch.randint(0, 16, (7, 13), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (7, 7) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed, 13), q)


@pytest.mark.parametrize("bits, group, bound", [(8, None, 1 / 255), (8, 64, 1 / 255), (4, None, 1 / 15),
                                                (4, 32, 1 / 15), (4, 48, 1 / 15)])
def test_integer_zero_points_are_within_half_a_step(bits, group, bound):
    torch.manual_seed(0)
    w = torch.randn(40, 100)
    qw = quantize(w, bits, group, integer_zeros=True)
    assert torch.equal(qw.zeros, qw.zeros.round())
    err = (dequantize(qw) - w).abs()
    g = qw.group_size
    for start in range(0, 100, g):  # half a quantization step of each group's range
        block = w[:, start:start + g]
        step = (block.amax(1).clamp(min=0) - block.amin(1).clamp(max=0)) * bound
        assert (err[:, start:start + g] <= step[:, None] / 2 + 1e-6).all()
    assert (qw.qweight.numel() * 8) / bits == pytest.approx(40 * 100, rel=0.02)


@pytest.mark.parametrize("bits, group", [(8, None), (8, 64), (4, None), (4, 32), (4, 48), (4, 128)])
def test_fit_is_no_worse_than_min_max_in_any_group(bits, group):
    """The default fit (float zero points; for 4 bits the range search with least-squares refits)
    against plain min/max of each group's own range, group by group, and against integer zero points
    overall. Heavy-tailed weights, like real ones, where narrowing the range pays."""
    torch.manual_seed(1)
    w = torch.distributions.StudentT(3.0).sample((64, 384))
    qw = quantize(w, bits, group, integer_zeros=False)
    default = quantize(w, bits, group)  # the fit up to groups of 32, integer zero points beyond
    assert torch.equal(default.zeros, default.zeros.round()) == (qw.group_size > 32)
    g = qw.group_size
    qmax = (1 << bits) - 1
    fit_err = ((dequantize(qw) - w) ** 2).view(64, -1, g).sum(-1)
    blocks = w.view(64, -1, g)
    lo, hi = blocks.amin(-1, keepdim=True), blocks.amax(-1, keepdim=True)
    scale = (hi - lo) / qmax
    minmax = torch.clamp(torch.round((blocks - lo) / scale), 0, qmax) * scale + lo
    # (float rounding of (q - z) * s against q * s + m is ~1e-7 of a weight: 1e-4 of an 8-bit error)
    assert (fit_err <= ((minmax - blocks) ** 2).sum(-1) * (1 + 1e-4) + 1e-9).all()
    integer = ((dequantize(quantize(w, bits, group, integer_zeros=True)) - w) ** 2).sum()
    assert fit_err.sum() < integer


@pytest.mark.parametrize("span", [(0, 15), (2, 13)])
def test_q4_1_groups_are_reproduced_exactly(span):
    """Weights that were Q4_1 (groups of 32, q * d + m with f16 d and m, as the embedded GGUF stores
    them) come back exactly, also when a group's integers do not reach 0 or 15."""
    torch.manual_seed(2)
    n, k = 24, 128
    q = torch.randint(span[0], span[1] + 1, (n, k)).float()
    q[:, ::32], q[:, 1::32] = span[0], span[1]  # each group spans exactly this range
    d = (torch.rand(n, k // 32) * 0.02 + 0.001).half().float()
    m = (torch.randn(n, k // 32) * 0.05).half().float()
    w = (q.view(n, -1, 32) * d[..., None] + m[..., None]).view(n, k)
    got = dequantize(quantize(w, 4, 32))
    torch.testing.assert_close(got, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("bits, group", [(8, None), (8, 32), (4, None), (4, 32), (8, 64), (4, 64)])
def test_quantized_linear_equals_dequantize_then_matmul(bits, group, monkeypatch):
    # 1 row: the compiled GEMV form (4-bit integers one per byte in fp32); 5 rows: the matmul form. Group 64
    # of 96 inputs leaves a partial last group, which the GEMV form takes as a product of its own (it used to
    # fall back to dequantizing the whole weight every token).
    from dashinfer_core.quant import linear as qlinear
    torch.manual_seed(1)
    w, b = torch.randn(48, 96), torch.randn(48)
    qw = quantize(w, bits, group)
    layer = QuantizedLinear(qw, b, (48,), torch.float32)
    assert torch.equal(layer.quantized().qweight, qw.qweight)
    matmul_rows = []
    matmul_form = qlinear.compiled_dequant_linear
    monkeypatch.setattr(qlinear, "compiled_dequant_linear",
                        lambda x, *a: matmul_rows.append(x.shape[0]) or matmul_form(x, *a))
    gemv_wanted = qlinear.compiled_dequant_gemv.active  # asked first: a failed compile still runs the GEMV form
    for rows in (1, qlinear.DEQUANT_GEMV_MAX_ROWS + 1):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(layer(x), x @ dequantize(qw).t() + b, atol=1e-4, rtol=1e-4)
    assert matmul_rows == ([] if gemv_wanted else [1]) + [qlinear.DEQUANT_GEMV_MAX_ROWS + 1]


@pytest.mark.parametrize("group", [32, 64])
@pytest.mark.parametrize("rows", [1, 5, 70])
def test_int4_bf16_linear_equals_dequantize_then_matmul(rows, group):
    """bf16 iq-int4 in groups on the CPU: torch's int4 kernel where it works (checked: the layer took its
    packing), the dequantizing matmul past INT4PACK_MAX_ROWS or where it does not; the same weight either way."""
    from dashinfer_core.capabilities import int4_gemv_works
    from dashinfer_core.quant.linear import INT4PACK_MAX_ROWS
    torch.manual_seed(4)
    w, b = torch.randn(48, 128), torch.randn(48)
    qw = quantize(w, 4, group)
    layer = QuantizedLinear(qw, b.bfloat16(), (48,), torch.bfloat16)
    assert (layer.int4_packed0 is not None) == int4_gemv_works()
    for n in (rows, INT4PACK_MAX_ROWS + 1):
        x = torch.randn(n, 128).bfloat16()
        ref = x.float() @ dequantize(qw).t() + b.bfloat16().float()
        out = layer(x)
        assert out.dtype == torch.bfloat16 and out.shape == (n, 48)
        torch.testing.assert_close(out.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=1e-2)


def test_int4_kernel_rows_and_compiled_dequant_route(monkeypatch):
    """Past int4pack_max_rows (lower where the CPU has no bf16 arithmetic: the dequantizing matmul's fp32 GEMM
    wins sooner there) the layer reads the kernel's packing through the dequantizing matmul; inside a compiled
    graph that is an operator, not a graph break, and both routes give the dequantized weight's product."""
    from dashinfer_core.capabilities import int4_gemv_works, native_bf16
    from dashinfer_core.quant import linear as qlinear
    if not int4_gemv_works():
        pytest.skip("torch's int4 kernel does not work here; test_int4_bf16_linear_equals_dequantize_then_matmul "
                    "covers the dequantizing matmul")
    assert qlinear.int4pack_max_rows() == (qlinear.INT4PACK_MAX_ROWS if native_bf16()
                                           else qlinear.INT4PACK_MAX_ROWS_FP32_GEMM)
    torch.manual_seed(5)
    w = torch.randn(128, 96)
    qw = quantize(w, 4, 32)
    layer = QuantizedLinear(qw, None, (128,), torch.bfloat16)
    assert layer.qweight is None and layer.int4pack_block in (32, 64)
    calls = []
    real = qlinear._int4pack_dequant_linear
    monkeypatch.setattr(qlinear, "_int4pack_dequant_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    limit = qlinear.int4pack_max_rows()
    compiled = torch.compile(layer.forward, fullgraph=True, dynamic=False)
    for rows in (limit, limit + 1):
        x = torch.randn(rows, 96).bfloat16()
        want = x.float() @ dequantize(qw).t()
        for out in (layer(x), compiled(x)):
            torch.testing.assert_close(out.float(), want, atol=2e-2 * want.abs().max().item(), rtol=1e-2)
    assert calls == [limit + 1]  # eagerly; the compiled graph calls the operator


@pytest.mark.parametrize("rows", [1, 3, INT8PACK_MAX_ROWS, INT8PACK_MAX_ROWS + 5])
def test_signed_int8_bf16_linear_equals_dequantize_then_matmul(rows):
    # bf16 on the CPU: decode-sized inputs take torch's int8 GEMV, bigger ones the compiled dequant path;
    # both must equal the same dequantized weight (up to bf16 rounding of the scales and the output).
    torch.manual_seed(3)
    w, b = torch.randn(40, 96), torch.randn(40)
    w[:, 0] += 3.0  # an off-centre channel range, so the zero points are far from 128
    qw = quantize(w, 8, None)
    signed = to_signed_int8(qw)
    assert signed.qweight.dtype == torch.int8 and torch.equal(dequantize(signed), dequantize(qw))
    layer = QuantizedLinear(signed, b.bfloat16(), (40,), torch.bfloat16)
    x = torch.randn(2, rows, 96).bfloat16()
    ref = x.float() @ dequantize(qw).t() + b.bfloat16().float()
    out = layer(x)
    assert out.dtype == torch.bfloat16 and out.shape == (2, rows, 40)
    torch.testing.assert_close(out.float(), ref, atol=2e-2 * ref.abs().max().item(), rtol=1e-2)


def test_a8w8_is_close_to_the_float_matmul():
    torch.manual_seed(2)
    w, x = torch.randn(64, 128), torch.randn(9, 128)
    qw = quantize(w, 8, None)
    layer = QuantizedLinear(qw, None, (64,), torch.float32, activations_int8=True)
    ref = x @ dequantize(qw).t()
    rel = (layer(x) - ref).norm() / ref.norm()
    assert rel < 0.02
    torch.testing.assert_close(a8w8_linear(x, layer.w_int8_t, layer.w_scale), layer(x))


def test_a8w8_routes_agree_and_the_choice_says_why(monkeypatch):
    """torch._int_mm serves a8w8 only where it is exact and faster than the fp32 product; both routes give
    the same sums (exact in fp32 below 2**24)."""
    from dashinfer_core import capabilities
    from dashinfer_core.quant import linear as linear_mod
    use, why = capabilities.int8_gemm_verdict()
    assert why and (use == why.startswith("torch._int_mm with")), why
    torch.manual_seed(3)
    w, x = torch.randn(48, 256), torch.randn(5, 256)
    layer = QuantizedLinear(quantize(w, 8, None), None, (48,), torch.float32, activations_int8=True)
    outs = {}
    for route in (True, False) if "inexact" not in why else (False,):  # a saturating _int_mm is wrong, not slow
        monkeypatch.setattr(linear_mod, "int8_gemm_works", lambda route=route: route)
        outs[route] = a8w8_linear(x, layer.w_int8_t, layer.w_scale)
    assert all(torch.equal(out, outs[False]) for out in outs.values())


CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]
QUESTIONS = ["What is the largest planet in our solar system?", "How many days are in a week?", "What is 2 plus 2?"]


@pytest.mark.parametrize("options", [dict(quantization="iq-int8"), dict(quantization="iq-int8", group_size=64),
                                     dict(quantization="iq-int4", group_size=32), dict(quantization="a8w8"),
                                     dict(quantization="iq-int8", dtype="bfloat16"),
                                     dict(quantization="iq-int4", group_size=32, dtype="bfloat16")])
def test_quantized_embedded_model_answers(default_model_dir, options):
    llm = LLM(device="cpu", **{"dtype": "float32", **options})
    outs = llm.chat([[{"role": "user", "content": q}] for q in QUESTIONS],
                    SamplingParams(max_tokens=24, temperature=0.0))
    # Fluent: words, not garbage. (a8w8 on an AMX machine answers "The answer is 4.": short and right.)
    assert all(o.error is None and len(o.text.split()) >= 3 for o in outs), [o.text for o in outs]
    if options["quantization"] != "iq-int4" or options.get("group_size") == 32:
        # int8 keeps the answers, and so does int4 in groups of 32 (the embedded Q4_1 weights, exactly)
        assert "7 days" in outs[1].text and "4" in outs[2].text, [o.text for o in outs]
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
    linears = [m for m in llm.engine.runner.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 4 * 30
    if options.get("dtype") == "bfloat16" and options["quantization"] == "iq-int8":  # the int8 GEMV layout
        gemv = stats.fast_paths["int8_gemv"].startswith("on")
        assert all((m.qweight.dtype == torch.int8) == gemv for m in linears)
    if options.get("dtype") == "bfloat16" and options["quantization"] == "iq-int4":  # the int4 kernel's packing
        gemv = stats.fast_paths["int4_gemv"].startswith("on")
        assert all((m.int4_packed0 is not None) == gemv for m in linears)
        # ... and only that packing, in the layout this CPU's kernel uses (AVX2 packs 32 rows a block, not 64)
        assert all((m.qweight is None) == gemv for m in linears)


def test_gptq_checkpoint_loads_exactly(tmp_path, tiny_models):
    """Quantize a tiny model ourselves, save it in the GPTQ layout, load it through the normal loader;
    compare with the same model dequantized by hand and saved as plain floats."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from dashinfer_core.quant.gptq import gptq_to_quantized, quantized_to_gptq
    src = tiny_models["llama"]
    gptq_dir, plain_dir = tmp_path / "gptq", tmp_path / "plain"
    for d in (gptq_dir, plain_dir):
        shutil.copytree(src, d)
        for f in d.glob("*.safetensors"):
            f.unlink()
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(str(f)))
    gptq_state, plain_state = {}, {}
    for name, tensor in state.items():
        base = name[:-len(".weight")]
        if name.endswith("_proj.weight"):
            qw = quantize(tensor.float(), 4, 32, integer_zeros=True)
            qw.zeros.clamp_(min=1)  # GPTQ's format cannot store a zero point of 0
            parts = quantized_to_gptq(qw)
            gptq_state.update({f"{base}.{k}": v for k, v in parts.items()})
            plain_state[name] = dequantize(gptq_to_quantized(parts, 32))  # by hand, from the GPTQ tensors
        else:
            gptq_state[name] = plain_state[name] = tensor
    save_file(gptq_state, str(gptq_dir / "model.safetensors"))
    save_file(plain_state, str(plain_dir / "model.safetensors"))
    cfg = json.loads((gptq_dir / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32, "desc_act": False,
                                  "sym": False, "checkpoint_format": "gptq"}
    (gptq_dir / "config.json").write_text(json.dumps(cfg))

    gptq_llm = LLM(str(gptq_dir), dtype="float32", device="cpu")
    plain_llm = LLM(str(plain_dir), dtype="float32", device="cpu")
    layer = gptq_llm.engine.runner.model.layers[1].self_attn.qkv_proj
    assert isinstance(layer, QuantizedLinear) and layer.bits == 4 and layer.group_size == 32
    # the plain engine's own weights are packed away (packed_linear): its checkpoint's q|k|v stand for them
    plain_qkv = torch.cat([plain_state[f"model.layers.1.self_attn.{p}_proj.weight"] for p in "qkv"])
    assert torch.equal(dequantize(layer.quantized()), plain_qkv)
    prompts = [[17 + i * 11 + j for j in range(5 + i)] for i in range(4)]
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    assert [o.token_ids for o in gptq_llm.generate(prompts, params)] == \
        [o.token_ids for o in plain_llm.generate(prompts, params)]

    cfg["quantization_config"]["desc_act"] = True
    (gptq_dir / "config.json").write_text(json.dumps(cfg))
    from dashinfer_core import UnsupportedModelError
    with pytest.raises(UnsupportedModelError, match="desc_act"):
        LLM(str(gptq_dir), dtype="float32", device="cpu")


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_quantization_store_then_read_error_bound(bits):
    from dashinfer_core.quant.kv import dequantize_kv, quantize_kv
    torch.manual_seed(3)
    x = torch.randn(7, 3, 64) * torch.rand(7, 3, 1) * 5
    q, scale, zero = quantize_kv(x, bits)
    assert q.shape == (7, 3, 64 if bits == 8 else 32) and q.dtype == torch.uint8
    back = dequantize_kv(q, scale, zero, bits)
    groups = x.unflatten(-1, (scale.shape[-1], -1))
    step = (groups.amax(-1) - groups.amin(-1)) / ((1 << bits) - 1)
    assert ((back - x).abs().unflatten(-1, (scale.shape[-1], -1)) <= step[..., None] / 2 + 1e-5).all()


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "uint4"])
def test_quantized_kv_cache_generates_and_frees(default_model_dir, kv_cache_dtype):
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(max_tokens=24, temperature=0.0)
    llm = LLM(dtype="float32", device="cpu", kv_cache_dtype=kv_cache_dtype, block_size=16,
              cpu_cache_memory=64 << 20, kv_cache_memory=24 << 20, max_num_batched_tokens=32)
    fp = LLM(dtype="float32", device="cpu", block_size=16, kv_cache_memory=24 << 20, max_num_batched_tokens=32)
    assert llm.engine.stats().num_blocks > 3 * fp.engine.stats().num_blocks  # the budget holds more blocks
    expected = [o.text for o in fp.chat(chats, params)]
    first = None
    for attempt in range(2):  # the second time the prompts come from the prefix cache
        outs = llm.chat(chats, params)
        texts = [o.text for o in outs]
        assert all(o.error is None and len(o.text.split()) >= 5 for o in outs), texts  # fluent sentences
        if kv_cache_dtype == "int8":  # int8 keeps fp32's greedy answers here; uint4 is lossier
            assert texts == expected
        if attempt:
            assert all(o.num_cached_tokens > 0 for o in outs)
            assert texts == first  # cached or not, the quantized cache is read back the same way
        first = texts
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_score_matches_hf_log_likelihood(tiny_models):
    from transformers import AutoModelForCausalLM
    ids = list(range(100, 170))
    llm = LLM(str(tiny_models["llama"]), dtype="float32", device="cpu", block_size=16)
    scores = llm.score(ids, chunk_tokens=24)  # chunks cross blocks and read the paged cache back
    hf = AutoModelForCausalLM.from_pretrained(str(tiny_models["llama"]), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([ids])).logits[0].float(), -1)[:-1].gather(
            1, torch.tensor(ids[1:])[:, None]).squeeze(1)
    torch.testing.assert_close(torch.tensor(scores), ref, atol=1e-4, rtol=1e-4)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks
