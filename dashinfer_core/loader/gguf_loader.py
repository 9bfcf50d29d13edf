"""GGUF weights loaded as they are (quantization="gguf"): llama.cpp's block formats become this package's
QuantizedWeight layouts with no dequantize-requantize round trip.

  Q4_0  blocks of 32: fp16 d, 16 bytes of nibbles        w = d * (q - 8)      -> 4 bits, group 32, zero 8
  Q4_1  blocks of 32: fp16 d, fp16 m, 16 bytes            w = d * q + m        -> 4 bits, group 32, zero -m/d
  Q4_K  super-blocks of 256: fp16 d, dmin, 6-bit (sc, mn) per 32, nibbles
                                                          w = d*sc * q - dmin*mn -> 4 bits, group 32
  Q8_0  blocks of 32: fp16 d, 32 int8                     w = d * q            -> 8 bits, group 32, zero 128
  Q6_K  super-blocks of 256: 6-bit q, int8 scale per 16, fp16 d
                                                          w = d*sc * (q - 32)  -> 8 bits, group 16, zero 32
  F32 / F16 / BF16 tensors load dense; any other type is dequantized with gguf-py's reader (logged).

In a Q4_0/Q4_1 block, byte j holds element j in its low nibble and element j + 16 in its high one; a
Q4_K super-block holds four runs of 64 elements, each as 32 bytes: low nibbles first, high nibbles next.
llama.cpp's converter permutes the rows of q and k for the llama architecture (rotary halves interleaved);
that permutation of rows is undone here on the quantized rows, which is exact.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from ..errors import UnsupportedModelError
from ..quant.weights import QuantizedWeight, pack_int4
from .default_model import write_dir_atomically

logger = logging.getLogger(__name__)

# GGUF tensor name (within a block) -> HF name
_BLOCK_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}
_TOP_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
              "output_norm.weight": "model.norm.weight"}
# architecture -> whether llama.cpp permuted q/k rows when converting
SUPPORTED_ARCHITECTURES = {"llama": True, "mistral": True, "qwen2": False}
HF_CLASSES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
NATIVE_TYPES = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q4_K", "Q8_0", "Q6_K")


def hf_name(gguf_name: str) -> str | None:
    """The HF checkpoint name of a GGUF tensor, or None for tensors the model derives itself."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    if gguf_name == "rope_freqs.weight":  # Llama 3 rope factors: config.json's rope_scaling holds them
        return None
    raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no place in the model")


def _field(reader, key: str):
    f = reader.fields.get(key)
    if f is None:
        return None
    value = f.parts[f.data[0]]
    return bytes(value).decode() if f.types and f.types[0].name == "STRING" else value.tolist()[0]


def _f16(blocks: torch.Tensor, start: int) -> torch.Tensor:
    """The fp16 at byte `start` of each block, as float32 [..., 1]."""
    return blocks[..., start:start + 2].contiguous().view(torch.float16).float()


def _q4_halves(qs: torch.Tensor) -> torch.Tensor:
    """[..., 16] bytes -> [..., 32] values: low nibbles (elements 0-15), then high nibbles (16-31)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K's 12 bytes -> eight 6-bit scales and eight 6-bit minimums (as ints)."""
    d, m, md = scales[..., 0:4].int(), scales[..., 4:8].int(), scales[..., 8:12].int()
    sc = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return sc, mn


def decode_blocks(qtype: str, raw: np.ndarray, n: int, k: int) -> QuantizedWeight:
    """A quantized [n, k] GGUF tensor (raw: uint8 [n, bytes per row]) as a QuantizedWeight."""
    data = torch.from_numpy(np.array(raw)).view(n, -1)  # a copy: the file is mapped read-only
    if qtype in ("Q4_0", "Q4_1", "Q8_0"):
        size = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}[qtype]
        blocks = data.view(n, k // 32, size)
        d = _f16(blocks, 0)
        if qtype == "Q8_0":
            q = (blocks[..., 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)
            return _weight(q, d, torch.full_like(d, 128.0), 8, 32, n, k)
        q = _q4_halves(blocks[..., size - 16:])
        if qtype == "Q4_0":
            return _weight(q, d, torch.full_like(d, 8.0), 4, 32, n, k)
        return _weight(*_scale_min(q, d, _f16(blocks, 2)), 4, 32, n, k)
    if qtype == "Q4_K":
        blocks = data.view(n, k // 256, 144)
        sc, mn = _k_scales(blocks[..., 4:16])
        scale = (_f16(blocks, 0) * sc).view(n, -1, 1)  # [n, k / 32, 1]
        minimum = -(_f16(blocks, 2) * mn).view(n, -1, 1)
        qs = blocks[..., 16:].reshape(n, k // 256, 4, 32)  # four runs of 64 elements
        q = torch.stack([qs & 0x0F, qs >> 4], dim=3).view(n, k // 32, 32)
        return _weight(*_scale_min(q, scale, minimum), 4, 32, n, k)
    if qtype == "Q6_K":
        blocks = data.view(n, k // 256, 210)
        ql, qh = blocks[..., :128].reshape(n, -1, 2, 64), blocks[..., 128:192].reshape(n, -1, 2, 32)
        low = torch.stack([ql & 0x0F, ql >> 4], dim=3).view(n, -1, 2, 4, 32)  # per 128: four runs of 32
        high = torch.stack([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], dim=3).view(n, -1, 2, 4, 32)
        q = (low | (high << 4)).view(n, k // 16, 16)
        scale = (blocks[..., 192:208].view(torch.int8).float() * _f16(blocks, 208)).view(n, -1, 1)
        return _weight(q, scale, torch.full_like(scale, 32.0), 8, 16, n, k)
    raise AssertionError(qtype)


def _scale_min(q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor):
    """(q, scale, zero) for w = scale * q + minimum; a block of scale 0 is its minimum: q 0, scale 1."""
    flat = scale == 0
    q = q.masked_fill(flat, 0)
    scale = torch.where(flat, 1.0, scale)
    return q, scale, -minimum / scale


def _weight(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group: int, n: int,
            k: int) -> QuantizedWeight:
    q = q.reshape(n, k).to(torch.uint8)
    return QuantizedWeight(pack_int4(q) if bits == 4 else q.contiguous(), scale.reshape(n, -1).contiguous(),
                           zero.reshape(n, -1).contiguous(), bits, group, (n, k))


def unpermute_rows(t, n_head: int):
    """Undo llama.cpp's q/k row permutation on a dense tensor or the rows of a QuantizedWeight."""
    rows = t.shape[0]
    # GGUF rows run (head, pair, half) where HF's run (head, half, pair)
    index = torch.arange(rows).view(n_head, rows // n_head // 2, 2).transpose(1, 2).reshape(rows)
    if isinstance(t, QuantizedWeight):
        return QuantizedWeight(t.qweight[index], t.scales[index], t.zeros[index], t.bits, t.group_size, t.shape)
    return t[index]


def iter_gguf(path: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """HF-named tensors of a GGUF file: dense ones in `dtype`, quantized ones as QuantizedWeight."""
    import gguf
    reader = gguf.GGUFReader(str(path))
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"GGUF general.architecture {arch!r} is not supported (supported: "
                                    f"{sorted(SUPPORTED_ARCHITECTURES)})")
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv") or heads
    dequantized: set[str] = set()
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            continue
        qtype = t.tensor_type.name
        shape = [int(s) for s in reversed(t.shape.tolist())]  # GGUF lists dims innermost first
        if qtype in ("F32", "F16", "BF16"):
            raw = np.array(t.data)
            value = torch.from_numpy(raw.view(np.int16)).view(torch.bfloat16) if qtype == "BF16" \
                else torch.from_numpy(raw)
            value = value.reshape(shape).to(dtype)
        elif qtype in NATIVE_TYPES and len(shape) == 2:
            value = decode_blocks(qtype, t.data, *shape)
        else:
            dequantized.add(qtype)
            value = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type)).reshape(shape).to(dtype)
        if SUPPORTED_ARCHITECTURES[arch] and t.name.endswith(("attn_q.weight", "attn_k.weight")):
            value = unpermute_rows(value, heads if "attn_q" in t.name else kv_heads)
        yield name, value
    if dequantized:
        logger.warning("GGUF %s: tensors of type %s were dequantized to %s (no native layout for them)",
                       path.name, sorted(dequantized), dtype)


def gguf_model_dir(gguf_file: Path, cache_root: Path) -> Path:
    """config.json and the tokenizer of a GGUF file, written once into the cache (no weights: those are
    read from the file itself). The tokenizer is left out where the file carries none (run such a model
    with skip_tokenizer_init)."""
    stat = gguf_file.stat()
    key = hashlib.sha256(f"{gguf_file.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_root / f"gguf-{gguf_file.stem}-{key}"
    if (target / "config.json").is_file():
        return target
    from transformers import AutoConfig, AutoTokenizer
    folder, name = str(gguf_file.parent), gguf_file.name
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=name).to_dict()
    except Exception as exc:
        raise UnsupportedModelError(f"model: {gguf_file} is not a GGUF file transformers can read a config "
                                    f"from ({str(exc).splitlines()[0][:200]})") from exc
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    if config.get("model_type") not in HF_CLASSES:
        raise UnsupportedModelError(f"model: GGUF model type {config.get('model_type')!r} is not supported "
                                    f"(supported: {sorted(HF_CLASSES)})")
    config["architectures"] = [HF_CLASSES[config["model_type"]]]

    def fill(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        try:
            AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(tmp))
        except Exception as exc:  # a weights-only file: prompts must then be token ids
            logger.warning("GGUF %s carries no tokenizer transformers can read (%s)", name,
                           str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__)
    write_dir_atomically(target, fill)
    return target
