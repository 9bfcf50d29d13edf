import os

import torch

# The Triton kernels on the CPU, under TRITON_INTERPRET=1 (tests): DASHINFER_FORCE_TRITON_OPS=1 in the
# environment before the engine is imported, or this flag set. Read once: a decode step asks ~8 times,
# and each look into os.environ costs about a microsecond.
FORCE_TRITON_OPS = os.environ.get("DASHINFER_FORCE_TRITON_OPS") == "1"


def use_triton_ops(x: torch.Tensor) -> bool:
    """Fused Triton kernels on CUDA; on the CPU only when forced (see FORCE_TRITON_OPS)."""
    return x.is_cuda or FORCE_TRITON_OPS
