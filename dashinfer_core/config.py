"""EngineConfig: every knob of the engine in one validated dataclass; every knob has a default."""
from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from .errors import InvalidParameterError

DTYPES = ("auto", "float32", "bfloat16", "float16")
BLOCK_SIZES = (16, 32, 64, 128)
ATTENTION_BACKENDS = ("auto", "torch", "triton")
QUANTIZATION_MODES = ("iq-int8", "iq-int4", "a8w8", "gguf")
KV_CACHE_DTYPES = ("auto", "int8", "uint4")


def option(default, help: str, choices: tuple | None = None, flag: bool = True, parse=None):
    """An EngineConfig field: its default, the help text and choices that the CLI and the FastChat
    worker turn into flags (engine_args.py). flag=False: not offered on the command line; parse: how the
    flag's text becomes the value (default: the field's type)."""
    return field(default=default, metadata={"help": help, "choices": choices, "flag": flag, "parse": parse})


@dataclass
class EngineConfig:
    model: str | None = option(None, "HF model directory (config.json + safetensors + tokenizer), a .gguf file "
                               "(its quantized weights load as they are), or None / 'default' for the "
                               "embedded SmolLM2-135M-Instruct")
    tokenizer: str | None = option(None, "tokenizer directory; default: the model directory")
    dtype: str = option("auto", "'auto' = float32 on the CPU (bfloat16 for GGUF weights), bfloat16 on CUDA",
                            DTYPES)
    device: str = option("auto", "'auto' = CUDA when available, else the CPU; 'cuda:1' picks a GPU")
    block_size: int = option(32, "tokens per KV block (DashInfer's span)", BLOCK_SIZES)
    kv_cache_memory: int | None = option(None, "KV cache budget in bytes; default: a fraction of free GPU memory "
                                         "on CUDA, 4 GiB on the CPU")
    gpu_memory_utilization: float = option(0.85, "fraction of the GPU's free memory (after weights) the KV cache "
                                           "may take when kv_cache_memory is unset")
    max_num_seqs: int = option(64, "sequences in one step at most")
    max_num_batched_tokens: int | None = option(None, "tokens in one step at most (decode tokens + prefill "
                                                "chunks); default: 512 on the CPU (4096 for the LLM API in "
                                                "bf16/fp16, as vLLM-CPU offline), 2048 on CUDA")
    max_model_len: int | None = option(None, "context length limit; default: the model's max_position_embeddings")
    enable_chunked_prefill: bool = option(True, "split long prompts across steps so running sequences keep decoding")
    enable_prefix_caching: bool = option(True, "reuse the KV of full blocks whose tokens (and parents) match an "
                                         "earlier request")
    cpu_cache_memory: int = option(0, "prefix cache CPU tier (DashInfer's CPU swap): bytes of host memory keeping "
                                   "blocks evicted from the device, copied back on a later hit; 0 = off")
    prefix_cache_ttl: float | None = option(300.0, "cached blocks unused for this many seconds no longer hit; "
                                            "unset = never expire")
    attention_backend: str = option("auto", "attention kernels: 'torch' (CPU path and reference), 'triton' "
                                    "(CUDA), 'auto' picks by device", ATTENTION_BACKENDS)
    seed: int = option(0, "seeds the random seeds of requests that set none")
    max_logprobs: int = option(20, "largest top-logprobs count a request may ask for (OpenAI allows 20)")
    enforce_eager: bool = option(False, "no CUDA graphs for decode batches (CUDA), no torch.compile'd decoder "
                                 "layers (CPU, bf16/fp16)")
    num_threads: int | None = option(None, "torch intra-op threads on the CPU; default: leave torch's setting")
    guided_compile_timeout: float = option(10.0, "guided decoding: a request whose pattern is not compiled "
                                           "within this many seconds fails alone")
    guided_compile_workers: int = option(2, "threads compiling guided patterns (a compile that overruns keeps "
                                         "its thread until it ends)")
    quantization: str | None = option(None, "weight quantization at load (InstantQuant): iq-int8, iq-int4 "
                                      "(weight-only, asymmetric) or a8w8 (int8 weights and per-token int8 "
                                      "activations); 'gguf' = a GGUF file's own quantized weights as they are (the default for a "
                                      ".gguf model; with model None, the embedded model's Q4_1/Q8_0 file); GPTQ "
                                      "checkpoints load as they are", QUANTIZATION_MODES)
    group_size: int | None = option(None, "input channels per quantization group (a multiple of 16); default: "
                                    "one group per output channel")
    kv_cache_dtype: str = option("auto", "KV cache storage: 'auto' (the model dtype), 'int8' or 'uint4' (per "
                                 "token and head, asymmetric)", KV_CACHE_DTYPES)
    skip_tokenizer_init: bool = option(False, "run without a tokenizer: prompts must be token ids, outputs carry "
                                       "token ids and no text")
    tensor_parallel_size: int = option(1, "ranks one model is split across (torch.distributed: gloo on the CPU, "
                                       "NCCL on CUDA); this process is rank 0 and starts the others")
    distributed_init_method: str | None = option(None, "how the ranks meet: unset = rank 0 starts the other ranks "
                                                 "on this host; 'env://' = every rank is started by torchrun or a "
                                                 "cluster scheduler (MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK)")
    cpu_threads_bind: str | None = option(None, "CPU cores of each rank, '|'-separated, e.g. '0-15|16-31' (as "
                                          "vLLM's VLLM_CPU_OMP_THREADS_BIND); unset = the cores split evenly")
    distributed_timeout: float = option(600.0, "seconds a rank waits in a collective before the group is declared "
                                        "broken")
    bucket_batch_shapes: bool = option(True, "CPU: pad each step's token count to one of a few sizes, so the GEMM "
                                       "and compile caches and the heap see a bounded set of shapes and memory "
                                       "levels off (engine/runner.py, padded_count)")
    enable_lora: bool = option(False, "serve LoRA adapters (PEFT directories) beside the base model: each request "
                               "may name one (LoRARequest); rows of different adapters share a step")
    max_loras: int = option(4, "adapters resident in device slots at once (a step mixes at most this many)")
    max_lora_rank: int = option(16, "largest adapter rank (r) accepted; slots are sized for it")
    max_cpu_loras: int | None = option(None, "adapters kept loaded in host memory (least recently used dropped "
                                       "first); default: max_loras")
    limit_images_per_prompt: int = option(4, "vision-language models: images one request may carry")
    max_image_pixels: int = option(4096 * 4096, "vision-language models: width x height of one image at most")
    max_image_bytes: int = option(20 << 20, "vision-language models: encoded size of one image at most")
    speculative: dict | None = option(None, "speculative decoding, as JSON on the command line: {\"method\": "
                                      "\"ngram\", \"num_speculative_tokens\": 4, \"prompt_lookup_max\": 4, "
                                      "\"prompt_lookup_min\": 2} or {\"method\": \"draft\", \"model\": PATH, "
                                      "\"num_speculative_tokens\": 4}; also \"disable_by_batch_size\" (speculate "
                                      "only while at most this many sequences decode, default 4)", parse=json.loads)
    disk_cache_dir: str | None = option(None, "prefix cache disk tier: a directory keeping KV blocks across restarts "
                                        "(blocks leaving the CPU tier, and computed blocks when "
                                        "disk_cache_write_behind); several engines may share it; unset = off")
    disk_cache_bytes: int = option(16 << 30, "the disk tier's byte budget for disk_cache_dir (least recently "
                                   "used files deleted first)")
    disk_cache_write_behind: bool = option(True, "write every full computed block to the disk tier as it "
                                           "completes (off: only blocks evicted from memory go to disk)")
    allowed_image_domains: str | None = option(None, "comma-separated hosts whose http(s) image URLs the engine may "
                                               "fetch; unset = no server-side fetches (data: URLs, files, PIL only)")

    def __post_init__(self):
        if self.model == "default":
            self.model = None
        gguf_model = is_gguf_file(self.model)
        if gguf_model and self.quantization is None:
            self.quantization = "gguf"  # a GGUF file's weights load as they are, as vLLM does
        _check(not gguf_model or self.quantization == "gguf", "quantization",
               f"a .gguf model loads its own quantized weights: leave it unset or 'gguf', got {self.quantization!r}")
        _check(self.quantization != "gguf" or self.model is None or gguf_model, "quantization",
               f"'gguf' loads a GGUF file's weights: give model a .gguf file (or None for the embedded model), "
               f"got model {self.model!r}")
        _check(self.quantization != "gguf" or self.group_size is None, "group_size",
               "a GGUF file's blocks fix their groups; leave group_size unset with quantization 'gguf'")
        for f in fields(self):  # the listed choices, in one place (option(..., choices))
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices is not None and value not in choices and not (value is None and f.default is None):
                raise InvalidParameterError(f.name, f"must be one of {choices}, got {value!r}")
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
        _check(0 <= self.max_logprobs <= 100, "max_logprobs", f"must be in [0, 100], got {self.max_logprobs!r}")
        _check(self.guided_compile_timeout > 0, "guided_compile_timeout",
               f"must be > 0 seconds, got {self.guided_compile_timeout!r}")
        _check(self.guided_compile_workers >= 1, "guided_compile_workers",
               f"must be >= 1, got {self.guided_compile_workers!r}")
        _check(self.group_size is None or (isinstance(self.group_size, int) and self.group_size >= 16
                                           and self.group_size % 16 == 0), "group_size",
               f"must be None or a multiple of 16, got {self.group_size!r}")
        _check(self.num_threads is None or self.num_threads >= 1, "num_threads",
               f"must be >= 1, got {self.num_threads!r}")
        _check(isinstance(self.tensor_parallel_size, int) and self.tensor_parallel_size >= 1, "tensor_parallel_size",
               f"must be an integer >= 1, got {self.tensor_parallel_size!r}")
        _check(self.distributed_init_method in (None, "env://"), "distributed_init_method",
               f"must be unset or 'env://', got {self.distributed_init_method!r}")
        _check(self.distributed_timeout > 0, "distributed_timeout", f"must be > 0 seconds, got {self.distributed_timeout!r}")
        _check(isinstance(self.max_loras, int) and self.max_loras >= 1, "max_loras",
               f"must be an integer >= 1, got {self.max_loras!r}")
        _check(isinstance(self.max_lora_rank, int) and 1 <= self.max_lora_rank <= 512, "max_lora_rank",
               f"must be an integer in [1, 512], got {self.max_lora_rank!r}")
        _check(self.max_cpu_loras is None or (isinstance(self.max_cpu_loras, int) and
                                              self.max_cpu_loras >= self.max_loras), "max_cpu_loras",
               f"must be >= max_loras ({self.max_loras}), got {self.max_cpu_loras!r}")
        for name in ("limit_images_per_prompt", "max_image_pixels", "max_image_bytes"):
            _check(isinstance(getattr(self, name), int) and getattr(self, name) >= 1, name,
                   f"must be an integer >= 1, got {getattr(self, name)!r}")
        _check(isinstance(self.disk_cache_bytes, int) and self.disk_cache_bytes > 0, "disk_cache_bytes",
               f"must be an integer > 0 bytes, got {self.disk_cache_bytes!r}")
        if self.disk_cache_dir is not None:
            _check(isinstance(self.disk_cache_dir, str) and bool(self.disk_cache_dir), "disk_cache_dir",
                   f"must be a directory path, got {self.disk_cache_dir!r}")
            _check(self.enable_prefix_caching, "disk_cache_dir", "the disk tier is part of the prefix cache: "
                   "it needs enable_prefix_caching")
        if self.speculative is not None:
            from .speculative.config import SpeculativeConfig
            self.speculative = SpeculativeConfig.parse(self.speculative)
        if self.cpu_threads_bind is not None:
            from .distributed.launcher import parse_cpu_bind
            groups = parse_cpu_bind(self.cpu_threads_bind)
            _check(len(groups) == self.tensor_parallel_size, "cpu_threads_bind",
                   f"needs one core list per rank ({self.tensor_parallel_size}), got {len(groups)}")

    @classmethod
    def from_kwargs(cls, **kwargs) -> "EngineConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidParameterError(unknown[0], f"unknown engine option; known options: {sorted(known)}")
        return cls(**kwargs)


def is_gguf_file(model: str | None) -> bool:
    """model names a GGUF file (its quantized weights then load as they are)."""
    return model is not None and str(model).endswith(".gguf")


def _check(ok: bool, field: str, message: str):
    if not ok:
        raise InvalidParameterError(field, message)
