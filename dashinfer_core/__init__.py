"""dashinfer-core: a fast, exact LLM inference engine in Python (PyTorch + Triton)."""
from .capabilities import isolate_compile_cache

# Before anything is torch.compile'd: inductor's disk cache does not key on the vector ISA, so code
# cached under another CPU or ATEN_CPU_CAPABILITY would be loaded as it is (NaN seen here).
isolate_compile_cache()
from .config import EngineConfig
from .engine.async_engine import AsyncEngine, RequestFailedError
from .engine.llm_engine import LLMEngine
from .errors import (DuplicateRequestError, EngineDeadError, InvalidParameterError, PromptTooLongError,
                     UnsupportedModelError)
from .llm import LLM
from .lora import LoRARequest
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "AsyncEngine", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput",
    "InvalidParameterError", "PromptTooLongError", "DuplicateRequestError", "UnsupportedModelError",
    "EngineDeadError", "RequestFailedError", "LoRARequest",
]
