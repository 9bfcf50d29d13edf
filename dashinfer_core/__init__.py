"""dashinfer-core: a fast, exact LLM inference engine in Python (PyTorch + Triton)."""
from .config import EngineConfig
from .engine.async_engine import AsyncEngine, RequestFailedError
from .engine.llm_engine import LLMEngine
from .errors import (DuplicateRequestError, EngineDeadError, InvalidParameterError, PromptTooLongError,
                     UnsupportedModelError)
from .llm import LLM
from .outputs import CompletionOutput, RequestOutput
from .sampling_params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "AsyncEngine", "LLMEngine", "EngineConfig", "SamplingParams", "RequestOutput", "CompletionOutput",
    "InvalidParameterError", "PromptTooLongError", "DuplicateRequestError", "UnsupportedModelError",
    "EngineDeadError", "RequestFailedError",
]
