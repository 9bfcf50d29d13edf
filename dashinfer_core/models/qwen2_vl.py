"""Qwen2-VL and Qwen2.5-VL: the Qwen2 language model of llama.py with M-RoPE (positions in three rows,
rotary.py) and image embeddings placed at the image tokens of a step (ForwardContext.mm_embeds), plus
the vision tower (vision.py) that turns an image's patches into those embeddings.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch

from ..distributed.parallel_state import SINGLE, TPGroup
from .llama import LlamaForCausalLM, run_layers
from .model_config import ModelConfig
from .vision import VisionConfig, VisionTower

# Checkpoint names of the vision tower: older files say visual.*, transformers 5 may say model.visual.*
_VISUAL_PREFIXES = ("visual.", "model.visual.")
_TEXT_PREFIX = ("model.language_model.", "model.")


class Qwen2VLForConditionalGeneration(LlamaForCausalLM):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, tp: TPGroup = SINGLE):
        super().__init__(cfg, dtype, max_positions, tp)
        self.visual = VisionTower(VisionConfig.from_hf(cfg.vision, qwen25=self.qwen25)).to(dtype)
        self.spatial_merge_size = self.visual.spatial_merge_size

    qwen25 = False

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
    def encode_images(self, pixel_values: torch.Tensor, grid_thw) -> torch.Tensor:
        """[patches, C*T*P*P] pixels of one or more images -> [their image tokens, hidden]."""
        param = next(self.visual.parameters())
        grid = [tuple(int(v) for v in row) for row in torch.as_tensor(grid_thw).tolist()]
        return self.visual(pixel_values.to(device=param.device, dtype=param.dtype), grid)

    def forward(self, input_ids, ctx):
        x = self.embed(input_ids)
        if ctx.mm_embeds is not None:  # the image tokens of this step take their image's embeddings
            index, rows = ctx.mm_embeds
            x[index] = rows.to(x.dtype)
        return run_layers(self.layers, self.norm, x, ctx, self.compiled_parts)


class Qwen2_5_VLForConditionalGeneration(Qwen2VLForConditionalGeneration):
    """Qwen2.5-VL: the same language model and M-RoPE; its vision tower has windowed attention, RMSNorm
    and a gated MLP."""

    qwen25 = True
