"""GGUF weights loaded as they are (quantization="gguf"): block decoding against gguf-py's own
dequantizer, a tiny GGUF model against HF transformers reading the same file, the embedded model's
Q4_1/Q8_0 file against the fp32 model dequantized from it, and the errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import hf_greedy, mixed_prompts, write_tiny_gguf

from dashinfer_core import LLM, InvalidParameterError, SamplingParams, UnsupportedModelError
from dashinfer_core.capabilities import int4_gemv_works
from dashinfer_core.loader.gguf_loader import decode_blocks
from dashinfer_core.quant.linear import INT4PACK_MAX_ROWS, QuantizedLinear
from dashinfer_core.quant.weights import dequantize, quantize

from fallback_run import QUESTIONS


def _k_quant_blocks(qtype: str, n: int, k: int, rng) -> np.ndarray:
    """Random Q4_K / Q6_K super-blocks (gguf-py cannot quantize them) with finite fp16 scales."""
    size = {"Q4_K": 144, "Q6_K": 210}[qtype]
    blocks = rng.integers(0, 256, size=(n, k // 256, size), dtype=np.uint8)
    scales = (rng.random((n, k // 256, 2)) * 0.01 + 1e-3).astype(np.float16).view(np.uint8)
    if qtype == "Q4_K":
        blocks[..., 0:4] = scales.reshape(n, k // 256, 4)  # d and dmin
    else:
        blocks[..., 208:210] = scales[..., 0:2]  # d
    return blocks.reshape(n, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q8_0", "Q4_K", "Q6_K"])
def test_blocks_decode_to_what_gguf_py_dequantizes(qtype):
    import gguf
    n, k = 8, 512
    rng = np.random.default_rng(0)
    kind = gguf.GGMLQuantizationType[qtype]
    if qtype in ("Q4_K", "Q6_K"):
        raw = _k_quant_blocks(qtype, n, k, rng)
    else:
        w = rng.standard_normal((n, k)).astype(np.float32)
        w[0, :32] = 0.25  # a flat block: Q4_1's step is 0
        raw = gguf.quants.quantize(w, kind)
    want = torch.from_numpy(gguf.quants.dequantize(raw, kind)).reshape(n, k)
    qw = decode_blocks(qtype, raw, n, k)
    assert qw.bits == (4 if qtype in ("Q4_0", "Q4_1", "Q4_K") else 8)
    torch.testing.assert_close(dequantize(qw), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_tiny_gguf_matches_hf_reading_the_same_file(tmp_path, family):
    """Mixed block types, layer 0's q/k/v in two formats (loaded dense), llama's permuted q/k rows:
    greedy fp32 output equals HF's from the file it dequantizes itself."""
    from transformers import AutoModelForCausalLM
    path = write_tiny_gguf(tmp_path / "tiny.gguf", family, types={"blk.0.attn_v": "Q8_0"})
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.float32)
    llm = LLM(str(path), dtype="float32", skip_tokenizer_init=True)
    model = llm.engine.runner.model
    assert llm.engine.config.quantization == "gguf"
    assert not isinstance(model.layers[0].self_attn.qkv_proj, QuantizedLinear)  # Q4_1 + Q4_0 + Q8_0: dense
    assert isinstance(model.layers[1].self_attn.qkv_proj, QuantizedLinear)
    assert model.layers[1].self_attn.o_proj.bits == 8 and model.embed_quant.bits == 8
    assert (model.logits_quant is model.embed_quant) == (family == "qwen2")  # tied, or its own Q4_1 output
    prompts = mixed_prompts(4, max_len=40, seed=5)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 12).tokens
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def _weight_bytes(model) -> int:
    tensors = list(model.parameters()) + [b for name, b in model.named_buffers() if "rotary" not in name]
    return sum(t.numel() * t.element_size() for t in tensors)


def test_embedded_gguf_as_is(default_model_dir):
    """The embedded Q4_1/Q8_0 file as it is: fp32 greedy equal to the fp32 model dequantized from it,
    weights under a third of that model's; bf16 on torch's int4 kernel answers right."""
    from dashinfer_core.loader.default_model import gguf_path
    params = SamplingParams(max_tokens=16, temperature=0.0)
    chats = [[{"role": "user", "content": q}] for q in QUESTIONS]
    plain = LLM(dtype="float32")
    want = [o.token_ids for o in plain.chat(chats, params)]
    plain_bytes = _weight_bytes(plain.engine.runner.model)
    del plain
    native = LLM(str(gguf_path()), dtype="float32")
    assert [o.token_ids for o in native.chat(chats, params)] == want
    assert _weight_bytes(native.engine.runner.model) < plain_bytes / 3
    del native
    fast = LLM(quantization="gguf", dtype="bfloat16")
    outs = fast.chat(chats, params)
    assert "7" in outs[0].text and "4" in outs[1].text, [o.text for o in outs]
    linears = [m for m in fast.engine.runner.model.modules() if isinstance(m, QuantizedLinear)]
    assert len(linears) == 4 * 30 + 1  # the layers' four, and the Q8_0 embedding / LM head
    assert all((m.int4_parts > 0) == int4_gemv_works() for m in linears)


@pytest.mark.parametrize("bits", [4, 8])
def test_int4_kernel_layouts_equal_dequantize_then_matmul(bits):
    """bf16 groups on torch's int4 kernel: 4 bits with only the kernel's packing kept, 8 bits as two
    4-bit halves; past INT4PACK_MAX_ROWS the dequantizing matmul (reading that packing for 4 bits)."""
    if not int4_gemv_works():
        pytest.skip("torch's int4 kernel does not work here; test_quant covers the dequantizing matmul")
    torch.manual_seed(3)
    w = torch.randn(128, 96)
    qw = quantize(w, bits, 32)
    layer = QuantizedLinear(qw, None, (128,), torch.bfloat16)
    assert layer.int4_parts == (1 if bits == 4 else 2)
    assert torch.equal(layer.quantized().qweight, qw.qweight)  # the 4-bit integers survive in the packing
    for rows in (1, 7, INT4PACK_MAX_ROWS + 3):
        x = torch.randn(rows, 96).bfloat16()
        want = x.float() @ dequantize(qw).t()
        torch.testing.assert_close(layer(x).float(), want, atol=2e-2 * want.abs().max().item(), rtol=1e-2)
    ids = torch.tensor([0, 127, 64, 5, 40])
    torch.testing.assert_close(layer.rows(ids).float(), dequantize(qw)[ids], atol=1e-2, rtol=1e-2)
    assert torch.equal(QuantizedLinear(qw, None, (128,), torch.float32).rows(ids), dequantize(qw)[ids])


def test_gguf_settings_are_checked(tmp_path, default_model_dir):
    with pytest.raises(InvalidParameterError, match="quantization"):
        LLM(str(default_model_dir), quantization="gguf")  # an HF directory has no GGUF blocks
    with pytest.raises(InvalidParameterError, match="quantization"):
        LLM(str(tmp_path / "m.gguf"), quantization="iq-int4")
    with pytest.raises(InvalidParameterError, match="group_size"):
        LLM(quantization="gguf", group_size=64)
    with pytest.raises(UnsupportedModelError, match="does not exist"):
        LLM(str(tmp_path / "missing.gguf"))
    import gguf
    w = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "gpt2")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedModelError, match="GGUF|gguf"):
        LLM(str(tmp_path / "odd.gguf"), skip_tokenizer_init=True)


def test_auto_dtype_of_gguf_weights_on_the_cpu():
    """'auto' keeps float32 on the CPU (exact) except for GGUF weights, which run on torch's int4 kernel in
    bfloat16 where it works here; an explicit dtype always wins."""
    from dashinfer_core.capabilities import int4_gemv_works
    from dashinfer_core.engine.runner import resolve_dtype
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) is torch.float32
    assert resolve_dtype("auto", cpu, "iq-int4") is torch.float32
    assert resolve_dtype("auto", cpu, "gguf") is (torch.bfloat16 if int4_gemv_works() else torch.float32)
    assert resolve_dtype("float32", cpu, "gguf") is torch.float32
