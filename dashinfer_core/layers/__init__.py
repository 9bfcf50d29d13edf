import os

import torch


def use_triton_ops(x: torch.Tensor) -> bool:
    """Fused Triton kernels on CUDA; on the CPU only when tests force them (under TRITON_INTERPRET=1)."""
    return x.is_cuda or os.environ.get("DASHINFER_FORCE_TRITON_OPS") == "1"
