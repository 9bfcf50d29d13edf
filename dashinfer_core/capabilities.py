"""What this machine can run fast, found once per process, and which fast path an engine takes.

Each CPU fast path has a plain fallback that runs wherever torch runs:

- onednn_linear: oneDNN's inner product (torch.ops.mkldnn._linear_pointwise) instead of F.linear,
  2-3x faster fp32 GEMMs on x86. In bf16 it needs avx512_bf16 or AMX: elsewhere oneDNN cannot build
  the primitive and raises mid-request. Fallback: F.linear (ATen's GEMM).
- packed_linear: bf16 and fp32 weights reordered once, at load, into oneDNN's blocked layout
  (torch.ops.mkldnn._reorder_linear_weight): oneDNN otherwise reorders every weight on every call. fp32 only
  where the packed product is bit for bit the plain oneDNN one (so fp32 answers do not move).
  Fallback: the plain weight through onednn_linear or F.linear.
- int8_gemv: torch._weight_int8pack_mm for per-channel iq-int8 weights at decode sizes, bf16 only.
  Fallback: the dequantizing matmul (quant/linear.py).
- int4_gemv: torch's CPU int4 kernel (_weight_int4pack_mm_for_cpu) for iq-int4 weights in groups of
  32-256 (and GGUF 4-bit blocks) at decode sizes; 8-bit groups as two 4-bit halves (iq-int8 in groups,
  GGUF Q8_0 and the LM head of the embedded model). bf16 only: its fp32 code is ~20x slower than its bf16
  one. Fallback: the dequantizing matmul.
- int8_gemm: torch._int_mm for a8w8 (int8 activations x int8 weights, int32 sums). oneDNN's AVX2 kernel
  (no VNNI) sums byte pairs in saturating 16-bit lanes and gets full-range inputs wrong (seen here:
  off by up to 37,725 of a few hundred thousand); torch 2.13's on another AVX2-only CPU is exact but ~18x
  slower than fp32, so it must also win a timing probe. Fallback: the same integer product in fp32.
- compiled_dequant: weight-only quantized matmuls (iq-int4, grouped iq-int8, and iq-int8 where the
  GEMV is off) as a compiled graph that dequantizes inside the matmul's loads.
- compiled_layers: the decoder layers' non-attention work as torch.compile'd graphs (CPU, bf16/fp16).
- compiled_attention: the compiled gather-in-the-reduction decode attention (layers/attention/torch_backend.py).
  The compiled paths need a C++ compiler for inductor; fallback: the same ops run eagerly.

Support is probed by running a tiny op of each kind, so a library that reports support but cannot
build the kernel (an older CPU, ONEDNN_MAX_CPU_ISA lowered) is caught when the engine starts.

Overrides, for tests and for users who want the portable routes: DASHINFER_DISABLE, a comma-separated
list of path names (or "all"); and the libraries' own ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY,
which make an AVX-512 machine behave like an AVX2 one.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

FAST_PATHS = ("onednn_linear", "packed_linear", "int8_gemv", "int4_gemv", "int8_gemm", "compiled_dequant", "compiled_layers", "compiled_attention")
# /proc/cpuinfo flags that decide a path (x86) or say what the core has (aarch64 "Features").
_INTERESTING_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_fp16", "amx_int8",
                      "asimd", "bf16", "i8mm", "sve")


@dataclass(frozen=True)
class Platform:
    machine: str  # x86_64, aarch64, arm64
    system: str  # Linux, Darwin, Windows
    torch_version: str
    cpu_capability: str  # the kernel set ATen dispatches to (AVX2, AVX512, DEFAULT, ...)
    cpu_flags: tuple[str, ...]
    onednn: bool
    onednn_bf16: bool  # oneDNN's own claim; the probe below is what counts
    onednn_fp16: bool
    cxx_compiler: str | None
    overrides: dict  # environment variables that change the choices

    def as_dict(self) -> dict:
        return asdict(self)


def disabled_paths() -> set[str]:
    names = {n.strip() for n in os.environ.get("DASHINFER_DISABLE", "").split(",") if n.strip()}
    if "all" in names:
        return set(FAST_PATHS)
    unknown = names - set(FAST_PATHS)
    if unknown:
        log.warning("DASHINFER_DISABLE: unknown path names %s (known: %s)", sorted(unknown), FAST_PATHS)
    return names & set(FAST_PATHS)


def _cpu_flags() -> tuple[str, ...]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features"):
                    present = set(line.split(":", 1)[1].split())
                    return tuple(f for f in _INTERESTING_FLAGS if f in present)
    except OSError:  # not Linux
        pass
    return ()


def _mkldnn_claim(name: str) -> bool:
    fn = getattr(getattr(torch.ops, "mkldnn", None), name, None)
    try:
        return bool(fn()) if fn is not None else False
    except Exception:
        return False


def _cxx_compiler() -> str | None:
    """The compiler inductor would use, if it is on the PATH."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
        return shutil.which(get_cpp_compiler())
    except Exception:
        for name in (os.environ.get("CXX"), "g++", "clang++", "c++"):
            if name and shutil.which(name):
                return shutil.which(name)
    return None


@functools.cache
def detect() -> Platform:
    overrides = {k: os.environ[k] for k in ("DASHINFER_DISABLE", "ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")
                 if os.environ.get(k)}
    return Platform(
        machine=platform.machine(), system=platform.system(), torch_version=torch.__version__,
        cpu_capability=torch.backends.cpu.get_cpu_capability(), cpu_flags=_cpu_flags(),
        onednn=torch.backends.mkldnn.is_available(),
        onednn_bf16=_mkldnn_claim("_is_mkldnn_bf16_supported"),
        onednn_fp16=_mkldnn_claim("_is_mkldnn_fp16_supported"),
        cxx_compiler=_cxx_compiler(), overrides=overrides)


def _all_cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.split(":", 1)[0].strip() in ("flags", "Features")), "")
    except OSError:
        return ""


def isolate_compile_cache() -> str:
    """Point torch.compile's on-disk cache at a folder of its own for this CPU and ISA setting.
    Inductor's cache keys do not cover the vector ISA it generated code for: a kernel cached on an
    AVX-512 machine (or under another ATEN_CPU_CAPABILITY) is loaded as it is where that code is
    wrong or crashes (seen here: NaN logits). Machines that share a home or /tmp, CI runners whose
    CPU changes between runs, and tests that lower the ISA all meet this."""
    key = "|".join((platform.machine(), torch.__version__, torch.backends.cpu.get_cpu_capability(),
                    os.environ.get("ONEDNN_MAX_CPU_ISA", ""), _all_cpu_flags()))
    tag = f"dashinfer-{platform.machine()}-{torch.backends.cpu.get_cpu_capability().lower()}-" \
          f"{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current and os.path.basename(current) == tag:
        return current
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        base = current or default_cache_dir()
    except Exception:
        base = current or os.path.join(tempfile.gettempdir(), "torchinductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(base, tag)
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


# ---- probes: run the op once on tiny tensors ------------------------------------------------------
_ONEDNN_LINEAR = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)


@functools.cache
def onednn_linear_dtypes() -> frozenset:
    """Dtypes for which oneDNN's linear builds and gives F.linear's answer here. fp16 is left to
    F.linear: oneDNN's fp16 path is slower than its fp32 one on every CPU we have measured."""
    if _ONEDNN_LINEAR is None or not torch.backends.mkldnn.is_available() or "onednn_linear" in disabled_paths():
        return frozenset()
    ok = set()
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(3, 64, generator=gen).to(dtype)
        w = torch.randn(24, 64, generator=gen).to(dtype)
        try:
            got = _ONEDNN_LINEAR(x, w, None, "none", [], "")
            if torch.allclose(got.float(), F.linear(x, w).float(), atol=0.1, rtol=0.02):
                ok.add(dtype)
        except Exception as exc:  # RuntimeError "could not create a primitive descriptor ..."
            log.info("oneDNN linear unavailable for %s: %s", dtype, str(exc).splitlines()[0][:120])
    return frozenset(ok)


def drop_onednn_dtype(dtype: torch.dtype, exc: Exception) -> None:
    """A oneDNN call failed after the probe passed (a shape it cannot build): F.linear from now on."""
    log.warning("oneDNN linear failed for %s (%s); using F.linear", dtype, str(exc).splitlines()[0][:120])
    _dropped.add(dtype)


_dropped: set = set()  # dtypes whose oneDNN calls failed at run time


def onednn_linear_on(dtype: torch.dtype) -> bool:
    return dtype in onednn_linear_dtypes() and dtype not in _dropped


@functools.cache
def packed_linear_works(dtype: torch.dtype = torch.bfloat16) -> bool:
    """oneDNN prepacks a weight of this dtype here and its inner product on the packed weight gives the plain
    weight's answer: bf16 within rounding of F.linear's; fp32 bit for bit what oneDNN gives on the plain
    weight at several rows (the fp32 products the engine computes today must not move: the packed layer keeps
    no plain copy to fall back on)."""
    reorder = getattr(getattr(torch.ops, "mkldnn", None), "_reorder_linear_weight", None)
    if "packed_linear" in disabled_paths() or reorder is None or dtype not in onednn_linear_dtypes():
        return False
    gen = torch.Generator().manual_seed(0)
    rows = 3 if dtype == torch.bfloat16 else 37  # fp32: past oneDNN's one-row GEMV, where it picks another kernel
    x = torch.randn(rows, 64, generator=gen).to(dtype)
    w = torch.randn(24, 64, generator=gen).to(dtype)
    try:
        got = _ONEDNN_LINEAR(x, reorder(w), None, "none", [], "")
        if dtype == torch.float32:
            return bool(torch.equal(got, _ONEDNN_LINEAR(x, w, None, "none", [], "")))
    except Exception as exc:
        log.info("oneDNN weight prepacking unavailable for %s: %s", dtype, str(exc).splitlines()[0][:120])
        return False
    return bool(torch.allclose(got.float(), F.linear(x, w).float(), atol=0.1, rtol=0.02))


@functools.cache
def int8_gemv_works() -> bool:
    if "int8_gemv" in disabled_paths() or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 64, generator=gen).bfloat16()
    q = torch.randint(-128, 128, (16, 64), generator=gen, dtype=torch.int8)
    scales = torch.rand(16, generator=gen).bfloat16()
    try:
        got = torch._weight_int8pack_mm(x, q, scales).float()
    except Exception as exc:
        log.info("int8 GEMV unavailable: %s", str(exc).splitlines()[0][:120])
        return False
    want = (x.float() @ q.float().t()) * scales.float()
    return bool(torch.allclose(got, want, atol=0.05 * float(want.abs().max()) + 1e-3, rtol=0.02))


INT4_GROUPS = (32, 64, 128, 256)  # the group sizes torch's CPU int4 kernel takes


@functools.cache
def int4_gemv_works() -> bool:
    """torch's CPU int4 kernel computes x @ ((q - 8) * s + z)^T for bf16 x here."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if "int4_gemv" in disabled_paths() or op is None:
        return False
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(0, 16, (32, 64), generator=gen, dtype=torch.int32)
    scales = torch.rand(2, 32, generator=gen) * 0.1
    zeros = torch.randn(2, 32, generator=gen) * 0.1
    x = torch.randn(3, 64, generator=gen).bfloat16()
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        got = op(x, packed, 32, torch.stack([scales, zeros], dim=-1).bfloat16()).float()
    except Exception as exc:
        log.info("int4 GEMV unavailable: %s", str(exc).splitlines()[0][:120])
        return False
    w = (q.float() - 8) * scales.t().repeat_interleave(32, 1) + zeros.t().repeat_interleave(32, 1)
    want = x.float() @ w.t()
    return bool(torch.allclose(got, want, atol=0.05 * float(want.abs().max()) + 1e-3, rtol=0.02))


@functools.cache
def int4pack_block() -> int:
    """Rows per block of torch's CPU int4 packing, in the layout quant/linear.py's unpack_int4pack reads
    (then 4-bit layers keep that copy only): 64 where ATen's kernel is built for AVX-512, 32 for AVX2. 0 for
    an unknown layout, which keeps our own packing beside it."""
    if not int4_gemv_works():
        return 0
    from .quant.linear import unpack_int4pack
    q = torch.randint(0, 16, (128, 64), generator=torch.Generator().manual_seed(1), dtype=torch.int32)
    try:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        if packed.dtype != torch.uint8 or packed.numel() != q.numel() // 2:
            return 0
        return next((block for block in (64, 32) if torch.equal(unpack_int4pack(packed, 128, 64, block).int(), q)), 0)
    except Exception:
        return 0


def int8_gemm_works() -> bool:
    return int8_gemm_verdict()[0]


@functools.cache
def int8_gemm_verdict() -> tuple[bool, str]:
    """(use torch._int_mm, why): it must give exact int32 sums for full-range int8 inputs (the case that
    saturates) and beat the fallback, the same integer product in fp32. torch 2.13 on an AVX2-only EPYC is exact
    but ~18x slower than that (54 against 3 ms for 64x576 @ 576x1536)."""
    if "int8_gemm" in disabled_paths():
        return False, "disabled by DASHINFER_DISABLE"
    if not hasattr(torch, "_int_mm"):
        return False, "this torch has no torch._int_mm; the integer product runs in fp32"
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-127, 128, (17, 128), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (128, 32), generator=gen, dtype=torch.int8)
    try:
        exact = bool(torch.equal(torch._int_mm(a, b), a.int() @ b.int()))
    except Exception as exc:
        log.info("int8 GEMM unavailable: %s", str(exc).splitlines()[0][:120])
        return False, "torch._int_mm fails on this CPU; the integer product runs in fp32"
    if not exact:
        return False, "torch._int_mm is inexact on this CPU (saturating int8 kernel); the integer product runs in fp32"
    a = torch.randint(-127, 128, (32, 512), generator=gen, dtype=torch.int8)
    b = torch.randint(-127, 128, (512, 512), generator=gen, dtype=torch.int8)
    int_ms = _best_ms(lambda: torch._int_mm(a, b))
    float_ms = _best_ms(lambda: torch.matmul(a.float(), b.float()))
    if int_ms > float_ms:
        return False, (f"torch._int_mm is slower here than the integer product in fp32 ({int_ms:.2f} against "
                       f"{float_ms:.2f} ms for 32x512 @ 512x512), which runs instead")
    return True, "torch._int_mm with int32 sums"


def _best_ms(fn, repeats: int = 3) -> float:
    fn()  # warm-up: first-call allocation and dispatch
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def compile_works() -> tuple[bool, str]:
    """(usable, why). Compiling itself is tried on first use; a failure there falls back for good."""
    if detect().cxx_compiler is None:
        return False, "no C++ compiler on the PATH for torch.compile (inductor)"
    return True, f"inductor with {detect().cxx_compiler}"


# ---- the choice for one engine ------------------------------------------------------------------
@dataclass(frozen=True)
class PathChoice:
    on: bool
    why: str

    def __str__(self) -> str:
        return ("on: " if self.on else "off: ") + self.why


def native_bf16() -> bool:
    """The CPU computes bf16 GEMMs in hardware (avx512_bf16 / AMX on x86, bf16 on Arm)."""
    return torch.bfloat16 in onednn_linear_dtypes() or "bf16" in detect().cpu_flags


def choose_cpu_paths(dtype: torch.dtype, quantization: str | None, group_size: int | None,
                     enforce_eager: bool) -> dict[str, PathChoice]:
    """Which fast path an engine with these settings takes on this CPU, and why."""
    off = disabled_paths()
    paths: dict[str, PathChoice] = {}

    if "onednn_linear" in off:
        paths["onednn_linear"] = PathChoice(False, "disabled by DASHINFER_DISABLE")
    elif onednn_linear_on(dtype):
        paths["onednn_linear"] = PathChoice(True, f"oneDNN inner product for {_name(dtype)}")
    elif dtype == torch.float16:
        paths["onednn_linear"] = PathChoice(False, "float16 runs through F.linear")
    elif not torch.backends.mkldnn.is_available() or _ONEDNN_LINEAR is None:
        paths["onednn_linear"] = PathChoice(False, "torch was built without oneDNN")
    else:
        paths["onednn_linear"] = PathChoice(False, f"oneDNN cannot build a {_name(dtype)} inner product on "
                                                   f"this CPU ({detect().cpu_capability}); F.linear instead")

    if dtype not in (torch.bfloat16, torch.float32):
        paths["packed_linear"] = PathChoice(False, "only for bfloat16 and float32 weights")
    elif "packed_linear" in off:
        paths["packed_linear"] = PathChoice(False, "disabled by DASHINFER_DISABLE")
    elif not onednn_linear_on(dtype) or not packed_linear_works(dtype):
        paths["packed_linear"] = PathChoice(False, f"oneDNN cannot prepack {_name(dtype)} weights on this CPU"
                                                   + (" with the plain weight's exact answers" if dtype == torch.float32
                                                      else ""))
    else:
        paths["packed_linear"] = PathChoice(True, f"{_name(dtype)} weights in oneDNN's blocked layout, reordered once")

    if quantization != "iq-int8" or group_size is not None or dtype != torch.bfloat16:
        paths["int8_gemv"] = PathChoice(False, "only for iq-int8 per-channel weights with bfloat16")
    elif "int8_gemv" in off:
        paths["int8_gemv"] = PathChoice(False, "disabled by DASHINFER_DISABLE")
    elif not int8_gemv_works():
        paths["int8_gemv"] = PathChoice(False, "torch._weight_int8pack_mm fails or is wrong here")
    else:
        paths["int8_gemv"] = PathChoice(True, "torch int8 GEMV for decode-sized batches")

    int4_groups = quantization in ("iq-int4", "iq-int8") and group_size in INT4_GROUPS or quantization == "gguf"
    if not int4_groups or dtype != torch.bfloat16:
        paths["int4_gemv"] = PathChoice(False, f"only for iq-int4/iq-int8 weights in groups of {INT4_GROUPS} (or a "
                                               "GGUF's blocks) with bfloat16")
    elif "int4_gemv" in off:
        paths["int4_gemv"] = PathChoice(False, "disabled by DASHINFER_DISABLE")
    elif not int4_gemv_works():
        paths["int4_gemv"] = PathChoice(False, "torch's CPU int4 kernel fails or is wrong here")
    else:
        paths["int4_gemv"] = PathChoice(True, "torch int4 GEMV for decode-sized batches")

    if quantization != "a8w8":
        paths["int8_gemm"] = PathChoice(False, "only for a8w8")
    elif "int8_gemm" in off:
        paths["int8_gemm"] = PathChoice(False, "disabled by DASHINFER_DISABLE")
    else:
        paths["int8_gemm"] = PathChoice(*int8_gemm_verdict())

    can_compile, why = compile_works()
    for name in ("compiled_dequant", "compiled_layers", "compiled_attention"):
        if name == "compiled_dequant" and not quantization:
            paths[name] = PathChoice(False, "no quantized weights")
        elif name in off:
            paths[name] = PathChoice(False, "disabled by DASHINFER_DISABLE")
        elif enforce_eager and name != "compiled_dequant":
            paths[name] = PathChoice(False, "enforce_eager")
        elif not can_compile:
            paths[name] = PathChoice(False, why)
        elif name == "compiled_layers" and dtype == torch.float32:
            # Eager fp32 stays bit-identical to HF transformers (inductor reorders the norms' sums).
            paths[name] = PathChoice(False, "float32 stays eager to match HF exactly")
        else:
            paths[name] = PathChoice(True, why)
    return paths


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
