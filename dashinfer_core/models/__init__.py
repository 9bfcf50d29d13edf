"""Model registry: HF `architectures` name -> implementation class."""
from __future__ import annotations

from ..errors import UnsupportedModelError
from .llama import LlamaForCausalLM
from .model_config import ModelConfig, load_model_config
from .qwen2_vl import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

MODEL_REGISTRY = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaForCausalLM,
    "GlmForCausalLM": LlamaForCausalLM,
    "Glm4ForCausalLM": LlamaForCausalLM,
    "Qwen2VLForConditionalGeneration": Qwen2VLForConditionalGeneration,
    "Qwen2_5_VLForConditionalGeneration": Qwen2_5_VLForConditionalGeneration,
}


def model_class(cfg: ModelConfig):
    try:
        return MODEL_REGISTRY[cfg.architecture]
    except KeyError:
        raise UnsupportedModelError(
            f"architecture {cfg.architecture!r} is not supported; supported: {sorted(MODEL_REGISTRY)}") from None


__all__ = ["MODEL_REGISTRY", "ModelConfig", "load_model_config", "model_class"]
