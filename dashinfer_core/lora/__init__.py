"""Multi-LoRA: PEFT adapters served beside the base model, rows of different adapters in one step."""
from .request import LoRARequest

__all__ = ["LoRARequest"]
