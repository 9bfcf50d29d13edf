"""LoRARequest: which adapter a request runs with (vLLM's shape, so users need no new habits)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InvalidParameterError


@dataclass(frozen=True)
class LoRARequest:
    """lora_name: what servers call it (the `model` a client asks for); lora_int_id: the engine's key
    for it, unique and >= 1; lora_path: a PEFT adapter directory."""
    lora_name: str
    lora_int_id: int
    lora_path: str

    def __post_init__(self):
        if not isinstance(self.lora_name, str) or not self.lora_name:
            raise InvalidParameterError("lora_name", f"must be a non-empty string, got {self.lora_name!r}")
        if not isinstance(self.lora_int_id, int) or isinstance(self.lora_int_id, bool) or self.lora_int_id < 1:
            raise InvalidParameterError("lora_int_id", f"must be an integer >= 1, got {self.lora_int_id!r}")
        if not isinstance(self.lora_path, str) or not self.lora_path:
            raise InvalidParameterError("lora_path", f"must be a directory path, got {self.lora_path!r}")

    @property
    def name(self) -> str:
        return self.lora_name

    @property
    def path(self) -> str:
        return self.lora_path
