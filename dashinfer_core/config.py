"""EngineConfig: every knob of the engine in one validated dataclass; every knob has a default."""
from __future__ import annotations

from dataclasses import dataclass, fields

from .errors import InvalidParameterError

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")
SUPPORTED_BLOCK_SIZES = (16, 32, 64, 128)
ATTENTION_BACKENDS = ("auto", "torch", "triton")


@dataclass
class EngineConfig:
    # Model: an HF directory (config.json + safetensors + tokenizer), or None / "default" for the
    # embedded SmolLM2-135M-Instruct.
    model: str | None = None
    # Tokenizer directory; None = the model directory.
    tokenizer: str | None = None
    # "auto" = float32 on the CPU, bfloat16 on CUDA.
    dtype: str = "auto"
    # "auto" = CUDA when available, else the CPU. "cuda:1" picks a GPU.
    device: str = "auto"
    # Tokens per KV block (DashInfer's span).
    block_size: int = 32
    # KV cache budget in bytes; None = a fraction of free GPU memory on CUDA, 1 GiB on the CPU.
    kv_cache_memory: int | None = None
    # Fraction of the GPU's free memory (after weights) that the KV cache may take when
    # kv_cache_memory is None.
    gpu_memory_utilization: float = 0.85
    # Sequences in one step at most.
    max_num_seqs: int = 64
    # Tokens in one step at most (decode tokens + prefill chunks); None = 512 on the CPU, 2048 on CUDA.
    max_num_batched_tokens: int | None = None
    # Context length limit; None = the model's max_position_embeddings.
    max_model_len: int | None = None
    # Split long prompts across steps so running sequences keep decoding.
    enable_chunked_prefill: bool = True
    # Reuse the KV of full blocks whose tokens (and parents) match an earlier request.
    enable_prefix_caching: bool = True
    # Prefix cache CPU tier (DashInfer's CPU swap): bytes of host memory that keep blocks evicted from
    # the device, copied back on a later hit instead of recomputed; 0 = off.
    cpu_cache_memory: int = 0
    # Cached blocks unused for this many seconds no longer hit; None = never expire.
    prefix_cache_ttl: float | None = 300.0
    # Attention kernels: "torch" (CPU path and reference), "triton" (CUDA), "auto" picks by device.
    attention_backend: str = "auto"
    # Seeds the random seeds of requests that set none.
    seed: int = 0
    # Largest top-logprobs count a request may ask for (OpenAI allows 20).
    max_logprobs: int = 20
    # True = no CUDA graphs for decode batches (CUDA), no torch.compile'd decoder layers (CPU, bf16/fp16).
    enforce_eager: bool = False
    # torch intra-op threads on the CPU; None = leave torch's setting.
    num_threads: int | None = None
    # Guided decoding: a request whose pattern is not compiled within this many seconds fails alone.
    guided_compile_timeout: float = 10.0
    # Threads compiling guided patterns (a compile that overruns keeps its thread until it ends).
    guided_compile_workers: int = 2
    # Weight quantization at load (InstantQuant): None, "iq-int8", "iq-int4" (weight-only, asymmetric),
    # or "a8w8" (int8 weights and per-token int8 activations). GPTQ checkpoints load as they are.
    quantization: str | None = None
    # Input channels per quantization group; None = one group per output channel.
    group_size: int | None = None
    # KV cache storage: "auto" (the model dtype), "int8" or "uint4" (per token and head, asymmetric).
    kv_cache_dtype: str = "auto"
    # Run without a tokenizer: prompts must be token ids, outputs carry token ids and no text.
    skip_tokenizer_init: bool = False
    # CPU: pad each step's token count to one of a few sizes, so the GEMM and compile caches and the
    # heap see a bounded set of shapes and memory levels off (engine/runner.py, padded_count).
    bucket_batch_shapes: bool = True

    def __post_init__(self):
        if self.model == "default":
            self.model = None
        _check(self.dtype in SUPPORTED_DTYPES, "dtype", f"must be one of {SUPPORTED_DTYPES}, got {self.dtype!r}")
        _check(self.block_size in SUPPORTED_BLOCK_SIZES, "block_size",
               f"must be one of {SUPPORTED_BLOCK_SIZES}, got {self.block_size!r}")
        _check(self.kv_cache_memory is None or self.kv_cache_memory > 0, "kv_cache_memory",
               f"must be > 0 bytes, got {self.kv_cache_memory!r}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "gpu_memory_utilization",
               f"must be in (0, 1], got {self.gpu_memory_utilization!r}")
        _check(isinstance(self.max_num_seqs, int) and self.max_num_seqs >= 1, "max_num_seqs",
               f"must be an integer >= 1, got {self.max_num_seqs!r}")
        _check(self.max_num_batched_tokens is None or self.max_num_batched_tokens >= 1,
               "max_num_batched_tokens", f"must be >= 1, got {self.max_num_batched_tokens!r}")
        _check(self.max_model_len is None or self.max_model_len >= 2, "max_model_len",
               f"must be >= 2, got {self.max_model_len!r}")
        _check(self.attention_backend in ATTENTION_BACKENDS, "attention_backend",
               f"must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        _check(0 <= self.max_logprobs <= 100, "max_logprobs", f"must be in [0, 100], got {self.max_logprobs!r}")
        _check(self.guided_compile_timeout > 0, "guided_compile_timeout",
               f"must be > 0 seconds, got {self.guided_compile_timeout!r}")
        _check(self.guided_compile_workers >= 1, "guided_compile_workers",
               f"must be >= 1, got {self.guided_compile_workers!r}")
        _check(self.quantization in (None, "iq-int8", "iq-int4", "a8w8"), "quantization",
               f"must be None, 'iq-int8', 'iq-int4' or 'a8w8', got {self.quantization!r}")
        _check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 16
                                           and self.group_size % 16 == 0), "group_size",
               f"must be None or a multiple of 16, got {self.group_size!r}")
        _check(self.kv_cache_dtype in ("auto", "int8", "uint4"), "kv_cache_dtype",
               f"must be 'auto', 'int8' or 'uint4', got {self.kv_cache_dtype!r}")
        _check(self.num_threads is None or self.num_threads >= 1, "num_threads",
               f"must be >= 1, got {self.num_threads!r}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidParameterError(unknown[0], f"unknown engine option; known options: {sorted(known)}")
        return cls(**kwargs)


def _check(ok: bool, field: str, message: str):
    if not ok:
        raise InvalidParameterError(field, message)
