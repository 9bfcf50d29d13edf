"""Shared fixtures: torch on one thread, tiny random-weight HF models saved to disk, the embedded
default model, and HF transformers references."""
from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The machine is offline: LiteLLM must read its bundled cost map, not retry a download on import.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
# Without a GPU, Triton kernels run under the interpreter; it must be on before they are defined.
if os.environ.get("DASHINFER_TEST_DEVICE", "cpu") == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from helpers import build_tiny_model  # noqa: E402

# CUDA-only tests run from benchmarks/gpu_check.sh (DASHINFER_TEST_DEVICE=cuda), never in CI.
collect_ignore = [] if os.environ.get("DASHINFER_TEST_DEVICE", "cpu") == "cuda" else ["gpu"]


@pytest.fixture(scope="session")
def default_model_dir():
    from dashinfer_core.loader import default_model_dir as resolve
    return resolve()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, default_model_dir):
    """Directories of tiny random models, one per supported family, keyed by family name."""
    root = tmp_path_factory.mktemp("tiny-models")
    return {family: build_tiny_model(family, root / family, default_model_dir)
            for family in ("llama", "qwen2", "qwen3", "mistral")}
