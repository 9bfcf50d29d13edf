"""Load an HF model directory: config.json plus one or several (sharded) safetensors files.

Weights are read only from safetensors (never pickle). Tensors are cast to the engine dtype on the
way in; a progress bar shows for checkpoints with many shards.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..config import is_gguf_file
from ..errors import UnsupportedModelError
from ..models import ModelConfig, model_class
from .default_model import cache_root, default_model_dir, gguf_path


def gguf_source(model: str | None, quantization: str | None) -> Path | None:
    """The GGUF file whose weights load as they are (quantization 'gguf'), or None."""
    if quantization != "gguf":
        return None
    return Path(model).expanduser() if is_gguf_file(model) else gguf_path()


def resolve_model_dir(model: str | None) -> Path:
    if model is None or model == "default":
        return default_model_dir()
    path = Path(model).expanduser()
    if is_gguf_file(model):
        if not path.is_file():
            raise UnsupportedModelError(f"model: GGUF file {model!r} does not exist")
        from .gguf_loader import gguf_model_dir
        return gguf_model_dir(path, cache_root())
    if not path.is_dir():
        raise UnsupportedModelError(f"model: directory {model!r} does not exist (give an HF model directory, "
                                    "or None / 'default' for the embedded SmolLM2-135M-Instruct)")
    if not (path / "config.json").is_file():
        raise UnsupportedModelError(f"model: {model!r} has no config.json; is it an HF model directory?")
    return path


def safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UnsupportedModelError(f"model: {model_dir} has no *.safetensors weights "
                                    "(pickled .bin checkpoints are not loaded, for safety)")
    return files


def iter_safetensors(model_dir: Path, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open
    from tqdm import tqdm

    files = safetensors_files(model_dir)
    for path in tqdm(files, desc="Loading safetensors", disable=len(files) < 2, unit="shard"):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                yield name, tensor.to(dtype) if tensor.is_floating_point() else tensor


def load_model(model_dir: Path, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
               max_positions: int, tp=None, gguf_file: Path | None = None) -> torch.nn.Module:
    """The model of `cfg` (load_model_config(model_dir)) with its weights, in eval mode; under tensor
    parallel (tp: a TPGroup), this rank's shard, each tensor read and sliced in turn. gguf_file: read the
    weights from that file instead, quantized ones kept as they are (gguf_loader.py)."""
    cls = model_class(cfg)
    with torch.device(device):
        model = cls(cfg, dtype, max_positions) if tp is None else cls(cfg, dtype, max_positions, tp=tp)
    if gguf_file is not None:
        from .gguf_loader import iter_gguf
        model.load_weights(iter_gguf(gguf_file, dtype))
    else:
        model.load_weights(iter_safetensors(model_dir, dtype))
    model.eval()
    return model
