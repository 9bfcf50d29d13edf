"""Reading a PEFT LoRA adapter directory (adapter_config.json + adapter_model.safetensors) into host
tensors, checked against the base model before anything is kept: a bad adapter raises
InvalidParameterError naming the field, and nothing of it stays loaded."""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InvalidParameterError
from ..models.model_config import ModelConfig
from .request import LoRARequest

# HF projection -> (our layer in the decoder layer, shard of it; None: the whole layer)
TARGETS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
           "o_proj": ("o_proj", None), "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
           "down_proj": ("down_proj", None)}
_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$")

# adapter_config.json fields this engine does not implement, with the value that means "not used".
_UNSUPPORTED = {"use_dora": False, "fan_in_fan_out": False, "lora_bias": False, "bias": "none",
                "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "layer_replication": None,
                "target_parameters": None, "alora_invocation_tokens": None, "use_qalora": False,
                "trainable_token_indices": None}


@dataclass
class LoRAAdapter:
    request: LoRARequest
    rank: int
    scaling: float  # lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora
    # (layer index, HF projection name) -> (A [r, in], B [out, r] with the scaling folded in), fp32
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]
    _digest: str | None = field(default=None, repr=False, compare=False)

    @property
    def digest(self) -> str:
        """Of the weights as applied (scaling folded in): what the KV computed with this adapter depends on.
        The prefix cache's disk tier names blocks by it; an adapter's id and name are only the caller's."""
        if self._digest is None:
            h = hashlib.sha256()
            for (layer, module), (a, b) in sorted(self.weights.items()):
                h.update(f"{layer}.{module}".encode())
                h.update(a.contiguous().numpy().tobytes())
                h.update(b.contiguous().numpy().tobytes())
            self._digest = h.hexdigest()
        return self._digest

    @property
    def num_bytes(self) -> int:
        return sum(a.numel() * a.element_size() + b.numel() * b.element_size() for a, b in self.weights.values())


def module_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """HF projection -> its full (out, in) weight shape in a dense decoder layer of this model."""
    q, kv, h, i = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    return {"q_proj": (q, h), "k_proj": (kv, h), "v_proj": (kv, h), "o_proj": (h, q),
            "gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}


def _bad(field: str, request: LoRARequest, message: str) -> InvalidParameterError:
    return InvalidParameterError(field, f"LoRA adapter {request.lora_name!r} ({request.lora_path}): {message}")


def load_adapter(request: LoRARequest, cfg: ModelConfig, max_lora_rank: int) -> LoRAAdapter:
    root = Path(request.lora_path)
    config_file, weights_file = root / "adapter_config.json", root / "adapter_model.safetensors"
    if not config_file.is_file():
        raise _bad("lora_path", request, "no adapter_config.json there (a PEFT LoRA directory is expected)")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise _bad("adapter_config.json", request, f"unreadable: {exc}") from exc
    if config.get("peft_type", "LORA") != "LORA":
        raise _bad("peft_type", request, f"only LORA adapters are supported, got {config.get('peft_type')!r}")
    for name, unused in _UNSUPPORTED.items():
        value = config.get(name, unused)
        if value not in (unused, None, False, [], {}):
            raise _bad(name, request, f"{value!r} is not supported (only {unused!r})")
    base_class = (config.get("auto_mapping") or {}).get("base_model_class")
    if base_class and base_class != cfg.architecture:
        raise _bad("auto_mapping.base_model_class", request,
                   f"the adapter was trained on a {base_class}, the engine serves a {cfg.architecture}")
    rank = config.get("r")
    if not isinstance(rank, int) or rank < 1:
        raise _bad("r", request, f"must be an integer >= 1, got {rank!r}")
    if rank > max_lora_rank:
        raise _bad("r", request, f"rank {rank} exceeds max_lora_rank {max_lora_rank}")
    alpha = config.get("lora_alpha", 8)
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise _bad("lora_alpha", request, f"must be a number, got {alpha!r}")
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    if not weights_file.is_file():
        found = sorted(p.name for p in root.iterdir() if p.name.startswith("adapter_model"))
        raise _bad("adapter_model.safetensors", request, "missing" + (f" (found {found}: convert the adapter to "
                                                                      f"safetensors)" if found else ""))
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(weights_file))
    except (SafetensorError, OSError) as exc:
        raise _bad("adapter_model.safetensors", request, f"unreadable: {exc}") from exc
    adapter = LoRAAdapter(request, rank, scaling, _check_weights(request, tensors, cfg, rank, scaling))
    adapter.digest  # computed here, on the loading thread, not on the step loop
    return adapter


def _check_weights(request: LoRARequest, tensors: dict[str, torch.Tensor], cfg: ModelConfig, rank: int,
                   scaling: float) -> dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]:
    shapes = module_shapes(cfg)
    sparse = cfg.moe.sparse_layers if cfg.moe is not None else ()
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.match(key)
        if match is None:
            raise _bad("target_modules", request, f"weight {key!r} is not a LoRA A/B matrix of a decoder "
                                                  f"layer's projection (embeddings and the LM head are not supported)")
        layer, module, which = int(match.group(1)), match.group(3), match.group(4)
        if module not in TARGETS:
            raise _bad("target_modules", request, f"{module!r} (in {key!r}) is not one of {sorted(TARGETS)}")
        if layer >= cfg.num_layers:
            raise _bad("target_modules", request, f"{key!r}: the base model has {cfg.num_layers} layers")
        if layer in sparse and module in ("gate_proj", "up_proj", "down_proj"):
            raise _bad("target_modules", request, f"{key!r}: layer {layer} is a mixture-of-experts block; "
                                                  f"LoRA on experts is not supported")
        halves.setdefault((layer, module), {})[which] = tensor
    if not halves:
        raise _bad("adapter_model.safetensors", request, "holds no LoRA weights")
    weights = {}
    for (layer, module), pair in sorted(halves.items()):
        if set(pair) != {"A", "B"}:
            raise _bad("adapter_model.safetensors", request, f"layer {layer} {module}: lora_A and lora_B "
                                                             f"must both be present")
        out_features, in_features = shapes[module]
        a, b = pair["A"], pair["B"]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise _bad("adapter_model.safetensors", request,
                       f"layer {layer} {module}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not fit the base "
                       f"model (want {(rank, in_features)} / {(out_features, rank)} for r={rank})")
        weights[(layer, module)] = (a.float().contiguous(), (b.float() * scaling).contiguous())
    return weights
