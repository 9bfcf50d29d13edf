"""ModelConfig: what the engine needs from an HF config.json, read the same way for the
transformers 4 layout (top-level rope_theta / rope_scaling) and the transformers 5 layout
(rope_parameters)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UnsupportedModelError


@dataclass(frozen=True)
class MoEConfig:
    """Mixture-of-experts layers (Qwen2-MoE, Qwen3-MoE, Mixtral), read as transformers reads them."""
    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    norm_topk_prob: bool  # renormalise the top-k routing weights to sum to 1
    sparse_layers: tuple[int, ...]  # layers whose MLP is the MoE block (the others are dense)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert (sigmoid-gated); 0 = none
    # Qwen casts the routing weights to the model dtype before weighting the experts; Mixtral keeps fp32.
    weights_in_model_dtype: bool = True


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
    moe: MoEConfig | None = None
    # GLM: rotary embedding on the first rotary_dim dims, as interleaved pairs; GLM-4: a norm after
    # attention and after the MLP, before each residual add.
    rotary_dim: int | None = None
    rotary_interleaved: bool = False
    post_sublayer_norms: bool = False
    # Qwen2-VL: M-RoPE (rotary frequencies split into temporal/height/width sections, each rotated by
    # its own position row) and the vision tower's config; None for text-only models.
    mrope_section: tuple[int, ...] | None = None
    vision: dict | None = None
    image_token_id: int | None = None
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
    top = raw
    if arch in VISION_LANGUAGE:  # the language model's fields sit in text_config (older files: at the top)
        raw = {**raw, **(raw.get("text_config") or {})}
    model_type = raw.get("model_type", "")
    num_heads = raw["num_attention_heads"]
    hidden = raw["hidden_size"]
    head_dim = head_dim_of(raw)

    rope = dict(raw.get("rope_parameters") or {})
    legacy_scaling = raw.get("rope_scaling") or {}
    rope_theta = rope.pop("rope_theta", None) or raw.get("rope_theta") or 10000.0
    if legacy_scaling and rope.get("rope_type", "default") == "default":
        rope.update(legacy_scaling)
    mrope_section = rope.pop("mrope_section", None)
    rope_type = rope.get("rope_type") or rope.get("type") or "default"
    if rope_type == "mrope":  # older Qwen2-VL files: M-RoPE over default frequencies
        rope_type = "default"
    rope["rope_type"] = rope_type
    rope.pop("type", None)
    if arch in VISION_LANGUAGE:
        if not mrope_section:
            raise UnsupportedModelError("rope_parameters.mrope_section: missing (Qwen2-VL needs M-RoPE)")
        if 2 * sum(mrope_section) != head_dim_of(raw):
            raise UnsupportedModelError(f"rope_parameters.mrope_section: {mrope_section} does not sum to half of "
                                        f"head_dim {head_dim_of(raw)}")

    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if eos is not None else ())
    gen_cfg = Path(model_dir) / "generation_config.json"
    if gen_cfg.is_file():
        gen_eos = json.loads(gen_cfg.read_text()).get("eos_token_id")
        if isinstance(gen_eos, list):
            eos_ids = tuple(dict.fromkeys(eos_ids + tuple(gen_eos)))
        elif gen_eos is not None:
            eos_ids = tuple(dict.fromkeys(eos_ids + (gen_eos,)))

    is_qwen2 = model_type in ("qwen2", "qwen2_moe") or arch in (
        "Qwen2ForCausalLM", "Qwen2MoeForCausalLM") or arch in VISION_LANGUAGE
    is_qwen3 = model_type in ("qwen3", "qwen3_moe") or arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")
    is_glm = arch in ("GlmForCausalLM", "Glm4ForCausalLM")
    partial = rope.pop("partial_rotary_factor", None) or raw.get("partial_rotary_factor") or (0.5 if is_glm else 1.0)
    if partial != 1.0 and not is_glm:
        raise UnsupportedModelError(f"partial_rotary_factor: {partial} is supported for the GLM family only")
    attention_bias = bool(raw.get("attention_bias", False))
    sliding = raw.get("sliding_window") if raw.get("use_sliding_window",
                                                   model_type in ("mistral", "mixtral")) else None
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
        # Qwen2 always has q/k/v biases (Qwen2-MoE's config may switch them off); Llama-style configs say.
        qkv_bias=bool(raw.get("qkv_bias", True)) if is_qwen2 else attention_bias,
        o_bias=False if (is_qwen2 or is_qwen3 or is_glm) else attention_bias,
        mlp_bias=bool(raw.get("mlp_bias", False)),
        qk_norm=is_qwen3,
        eos_token_ids=eos_ids,
        bos_token_id=raw.get("bos_token_id"),
        sliding_window=sliding,
        hidden_act=raw.get("hidden_act", "silu"),
        moe=read_moe_config(arch, raw),
        rotary_dim=int(head_dim * partial) if is_glm else None,
        rotary_interleaved=is_glm,
        post_sublayer_norms=arch == "Glm4ForCausalLM",
        mrope_section=tuple(mrope_section) if arch in VISION_LANGUAGE else None,
        vision=top.get("vision_config") if arch in VISION_LANGUAGE else None,
        image_token_id=top.get("image_token_id") if arch in VISION_LANGUAGE else None,
        raw=raw,
    )


VISION_LANGUAGE = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


def head_dim_of(raw: dict) -> int:
    return raw.get("head_dim") or raw["hidden_size"] // raw["num_attention_heads"]


def read_moe_config(arch: str, raw: dict) -> MoEConfig | None:
    """The MoE layout of a Qwen2-MoE / Qwen3-MoE / Mixtral config (None for a dense model). Fields
    the engine cannot honour raise UnsupportedModelError naming them."""
    num_layers = raw["num_hidden_layers"]
    if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"):
        # Hub checkpoints say num_experts; transformers 5 saves Qwen3-MoE's as num_local_experts.
        num_experts = raw["num_experts"] if raw.get("num_experts") is not None else _require(raw, "num_local_experts")
        step = raw.get("decoder_sparse_step", 1)
        only_dense = raw.get("mlp_only_layers") or []
        if not isinstance(step, int) or step < 1:
            raise UnsupportedModelError(f"decoder_sparse_step: must be an integer >= 1, got {step!r}")
        sparse = tuple(i for i in range(num_layers)
                       if i not in only_dense and num_experts > 0 and (i + 1) % step == 0)
        moe = MoEConfig(num_experts=num_experts, top_k=_require(raw, "num_experts_per_tok"),
                        intermediate_size=_require(raw, "moe_intermediate_size"),
                        norm_topk_prob=bool(raw.get("norm_topk_prob", False)), sparse_layers=sparse,
                        shared_expert_intermediate_size=(raw.get("shared_expert_intermediate_size") or 0)
                        if arch == "Qwen2MoeForCausalLM" else 0)
    elif arch == "MixtralForCausalLM":
        moe = MoEConfig(num_experts=_require(raw, "num_local_experts"), top_k=_require(raw, "num_experts_per_tok"),
                        intermediate_size=raw["intermediate_size"], norm_topk_prob=True,
                        sparse_layers=tuple(range(num_layers)), weights_in_model_dtype=False)
    else:
        return None
    if not 1 <= moe.top_k <= moe.num_experts:
        raise UnsupportedModelError(f"num_experts_per_tok: must be in [1, {moe.num_experts}], got {moe.top_k}")
    for name in ("router_type", "scoring_func", "topk_method", "n_group", "topk_group"):
        if raw.get(name) not in (None, "softmax", "greedy"):  # only softmax routing over all experts
            raise UnsupportedModelError(f"{name}: {raw[name]!r} routing is not supported (softmax top-k only)")
    return moe


def _require(raw: dict, name: str):
    if raw.get(name) is None:
        raise UnsupportedModelError(f"{name}: missing from config.json (needed for the MoE layers)")
    return raw[name]
