"""CPU, half precision: each decoder layer's work before and after attention (norms, projections,
RoPE, SiLU-mul, residual adds) as torch.compile'd graphs, so a step pays one call per part instead
of ~35 eager ops each. At batch 1 the step is dominated by that per-op dispatch: on the dev machine a
bf16 + iq-int8 decode step went from 16.7 to 13.8 ms.

Not used in fp32, where the eager ops keep results bit-identical to HF transformers (inductor fuses
the RMSNorm reductions in another order), nor with enforce_eager. Attention stays outside: it reads
the paged cache through host-side metadata and has its own compiled kernel (layers/attention/torch_backend.py).
"""
from __future__ import annotations

import torch

from ..compiling import compile_or_eager
from .llama import DecoderLayer

# One compiled function per part for the whole process (dynamo caches by code object anyway);
# token counts are dynamic, 1 (a single decode) gets its own graph. Both parts are pure functions of
# their inputs, so after a compile failure (no C++ compiler, an unsupported op) eager gives the same.
compiled_pre = compile_or_eager(DecoderLayer.pre_attention, name="compiled decoder layers (pre-attention)",
                                dynamic=True)
compiled_post = compile_or_eager(DecoderLayer.post_attention, name="compiled decoder layers (post-attention)",
                                 dynamic=True)


class CompiledLayerParts:
    """What DecoderLayer.forward calls instead of its eager parts."""

    pre = staticmethod(compiled_pre)
    post = staticmethod(compiled_post)

    @property
    def failed(self) -> bool:
        return compiled_pre.failed or compiled_post.failed


def wants_compiled_layers(device: torch.device, dtype: torch.dtype, enabled: bool) -> bool:
    """enabled: the capability choice (capabilities.choose_cpu_paths) for this engine."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and enabled
