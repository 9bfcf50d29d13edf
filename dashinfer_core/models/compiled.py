"""CPU, half precision: each decoder layer's work before and after attention (norms, projections,
RoPE, SiLU-mul, residual adds) as torch.compile'd graphs, so a step pays one call per part instead
of ~35 eager ops each. At batch 1 the step is dominated by that per-op dispatch: on the dev machine a
bf16 + iq-int8 decode step went from 16.7 to 13.8 ms.

Not used in fp32, where the eager ops keep results bit-identical to HF transformers (inductor fuses
the RMSNorm reductions in another order), nor with enforce_eager. Attention stays outside: it reads
the paged cache through host-side metadata and has its own compiled kernel (layers/attention.py).
"""
from __future__ import annotations

import logging

import torch

from .llama import DecoderLayer

log = logging.getLogger(__name__)

# One compiled function per part for the whole process (dynamo caches by code object anyway);
# token counts are dynamic, 1 (a single decode) gets its own graph.
_compiled_pre = torch.compile(DecoderLayer.pre_attention, dynamic=True)
_compiled_post = torch.compile(DecoderLayer.post_attention, dynamic=True)


class CompiledLayerParts:
    """What DecoderLayer.forward calls instead of its eager parts; falls back to eager for good on the
    first compile failure (no C++ compiler, an unsupported op), which is safe because both parts are
    pure functions of their inputs."""

    def __init__(self):
        self.failed = False

    def pre(self, layer, x, residual, positions, rope):
        if not self.failed:
            try:
                return _compiled_pre(layer, x, residual, positions, rope)
            except Exception as exc:
                self._fail(exc)
        return layer.pre_attention(x, residual, positions, rope)

    def post(self, layer, out, residual):
        if not self.failed:
            try:
                return _compiled_post(layer, out, residual)
            except Exception as exc:
                self._fail(exc)
        return layer.post_attention(out, residual)

    def _fail(self, exc: Exception) -> None:
        log.warning("compiled decoder layers unavailable (%s); running them eagerly", exc)
        self.failed = True


def wants_compiled_layers(device: torch.device, dtype: torch.dtype, enabled: bool) -> bool:
    """enabled: the capability choice (capabilities.choose_cpu_paths) for this engine."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and enabled
