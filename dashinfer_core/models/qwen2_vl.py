"""Qwen2-VL and Qwen2.5-VL: the Qwen2 language model of llama.py with M-RoPE (positions in three rows, rotary.py) and
image embeddings placed at the image tokens of a step (ForwardContext.mm_embeds), plus the vision
tower that turns an image's patches into those embeddings.

The vision tower is transformers' own module (Qwen2VisionTransformerPretrainedModel, built from the
checkpoint's vision_config and given our weights): it runs once per image, outside the paged language
model, so the engine gains nothing by re-implementing it, and using the reference keeps the embeddings
exact. Everything the engine schedules (the language model, positions, placement) is ours.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..distributed.parallel_state import SINGLE, TPGroup
from .llama import LlamaForCausalLM
from .model_config import ModelConfig

# Checkpoint names of the vision tower: older files say visual.*, transformers 5 may say model.visual.*
_VISUAL_PREFIXES = ("visual.", "model.visual.")
_TEXT_PREFIX = ("model.language_model.", "model.")


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, tp: TPGroup = SINGLE):
        super().__init__(cfg, dtype, max_positions, tp)
        config_cls, tower_cls = self.vision_classes()
        vision_config = config_cls(vision_config=cfg.vision).vision_config
        vision_config._attn_implementation = "sdpa"
        self.visual = tower_cls._from_config(vision_config, dtype=dtype)
        self.spatial_merge_size = vision_config.spatial_merge_size

    @staticmethod
    def vision_classes():
        from transformers import Qwen2VLConfig
        from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VisionTransformerPretrainedModel
        return Qwen2VLConfig, Qwen2VisionTransformerPretrainedModel

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        visual = dict(self.visual.named_parameters())
        loaded: set[str] = set()

        def text_weights():
            for name, tensor in weights:
                prefix = next((p for p in _VISUAL_PREFIXES if name.startswith(p)), None)
                if prefix is None:
                    if name.startswith(_TEXT_PREFIX[0]):
                        name = _TEXT_PREFIX[1] + name[len(_TEXT_PREFIX[0]):]
                    yield name, tensor
                    continue
                key = name[len(prefix):]
                if key not in visual:
                    raise ValueError(f"unexpected weight {name!r} in checkpoint")
                if tuple(visual[key].shape) != tuple(tensor.shape):
                    raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(visual[key].shape)}")
                visual[key].data.copy_(tensor)
                loaded.add(key)

        super().load_weights(text_weights())
        missing = sorted(set(visual) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing vision weights, e.g. visual.{missing[0]}")

    @torch.inference_mode()
    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """[patches, C*T*P*P] pixels of one or more images -> [their image tokens, hidden]."""
        param = next(self.visual.parameters())
        out = self.visual(pixel_values.to(device=param.device, dtype=param.dtype), grid_thw=grid_thw.to(param.device))
        return getattr(out, "pooler_output", out)

    def forward(self, input_ids, ctx):
        x = self.embed(input_ids)
        if ctx.mm_embeds is not None:  # the image tokens of this step take their image's embeddings
            index, rows = ctx.mm_embeds
            x[index] = rows.to(x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx, self.compiled_parts)
        x, _ = self.norm(x, residual)
        return x


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: the same language model and M-RoPE; its vision tower has windowed attention, RMSNorm
    and a gated MLP (transformers' Qwen2_5_VisionTransformerPretrainedModel)."""

    @staticmethod
    def vision_classes():
        from transformers import Qwen2_5_VLConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel
        return Qwen2_5_VLConfig, Qwen2_5_VisionTransformerPretrainedModel
