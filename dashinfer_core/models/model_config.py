"""ModelConfig: what the engine needs from an HF config.json, read the same way for the
transformers 4 layout (top-level rope_theta / rope_scaling) and the transformers 5 layout
(rope_parameters)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float
    # {"rope_type": "default" | "linear" | "llama3", ...} with the type's own keys.
    rope_scaling: dict = field(default_factory=dict)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    eos_token_ids: tuple[int, ...] = ()
    bos_token_id: int | None = None
    sliding_window: int | None = None
    hidden_act: str = "silu"
    # The raw config.json, for quantization_config and anything family-specific.
    raw: dict = field(default_factory=dict, compare=False, repr=False)


def load_model_config(model_dir: Path) -> ModelConfig:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise UnsupportedModelError(f"model directory {model_dir} has no config.json")
    raw = json.loads(path.read_text())
    archs = raw.get("architectures") or []
    if not archs:
        raise UnsupportedModelError(f"{path}: 'architectures' is missing")
    arch = archs[0]
    model_type = raw.get("model_type", "")
    num_heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    head_dim = raw.get("head_dim") or hidden // num_heads

    rope = dict(raw.get("rope_parameters") or {})
    legacy_scaling = raw.get("rope_scaling") or {}
    rope_theta = rope.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
    if legacy_scaling and rope.get("rope_type", "default") == "default":
        rope.update(legacy_scaling)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    rope["rope_type"] = rope_type
    rope.pop("type", None)

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():
        gen_eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if isinstance(gen_eos, list):
            eos_ids = tuple(dict.fromkeys(eos_ids + tuple(gen_eos)))
        elif gen_eos is not None:
            eos_ids = tuple(dict.fromkeys(eos_ids + (gen_eos,)))

    is_qwen2 = model_type == "qwen2" or arch == "Qwen2ForCausalLM"
    is_qwen3 = model_type == "qwen3" or arch == "Qwen3ForCausalLM"
    attention_bias = bool(raw.get("attention_bias", False))
    sliding = raw.get("sliding_window") if raw.get("use_sliding_window", model_type == "mistral") else None
    return ModelConfig(
        architecture=arch,
        model_type=model_type,
        vocab_size=raw["vocab_size"],
        hidden_size=hidden,
        intermediate_size=raw["intermediate_size"],
        num_layers=raw["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=raw.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        rope_theta=float(rope_theta),
        rope_scaling=rope,
        # Qwen2 always has q/k/v biases (its config has no switch); Llama-style configs say.
        qkv_bias=True if is_qwen2 else attention_bias,
        o_bias=False if (is_qwen2 or is_qwen3) else attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=is_qwen3,
        eos_token_ids=eos_ids,
        bos_token_id=raw.get("bos_token_id"),
        sliding_window=sliding,
        hidden_act=raw.get("hidden_act", "silu"),
        raw=raw,
    )
