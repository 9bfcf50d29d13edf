from .default_model import default_model_dir
from .hf_loader import iter_safetensors, load_model, resolve_model_dir

__all__ = ["default_model_dir", "iter_safetensors", "load_model", "resolve_model_dir"]
