from .default_model import default_model_dir
from .hf_loader import gguf_source, is_gguf_file, iter_safetensors, load_model, resolve_model_dir

__all__ = ["default_model_dir", "gguf_source", "is_gguf_file", "iter_safetensors", "load_model", "resolve_model_dir"]
