"""CPU, half precision: the decoder layers' work around attention (norms, projections, RoPE, SiLU-mul,
residual adds) as torch.compile'd graphs, so a step pays one call per part instead of ~35 eager ops
each: the first layer's part before attention, then one graph from each attention to the next (layer
i's part after it joined with layer i + 1's before), and the last layer's part after attention with the
final norm. At batch 1 the step is dominated by that per-op dispatch: on the dev machine a bf16 +
iq-int8 decode step went from 16.7 to 13.8 ms with a graph per part, fewer calls since.

Not used in fp32, where the eager ops keep results bit-identical to HF transformers (inductor fuses
the RMSNorm reductions in another order), nor with enforce_eager. Attention stays outside: it reads
the paged cache through host-side metadata and has its own compiled kernel (layers/attention/torch_backend.py).
"""
from __future__ import annotations

import torch

from ..compiling import compile_or_eager
from .llama import DecoderLayer

# One compiled function per part for the whole process (dynamo caches by code object anyway);
# token counts are dynamic, 1 (a single decode) gets its own graph. The parts are pure functions of
# their inputs, so after a compile failure (no C++ compiler, an unsupported op) eager gives the same.
compiled_pre = compile_or_eager(DecoderLayer.pre_attention, name="compiled decoder layers (pre-attention)",
                                dynamic=True)


def between_attentions(layer: DecoderLayer, next_layer: DecoderLayer, out, residual, positions, cos_sin, rotary):
    """Layer i's work after its attention and layer i + 1's before its own, as one graph: a step calls the
    compiled graphs half as often (each call costs ~20-40 us of dynamo guards and wrappers besides its
    kernels, ~60 calls a step on a 30-layer model at batch 1)."""
    h, residual = DecoderLayer.post_attention(layer, out, residual)
    return DecoderLayer.pre_attention(next_layer, h, residual, positions, cos_sin, rotary)


def after_last_attention(layer: DecoderLayer, norm, out, residual):
    """The last layer's work after its attention, and the model's final norm."""
    h, residual = DecoderLayer.post_attention(layer, out, residual)
    return norm(h, residual)[0]


compiled_between = compile_or_eager(between_attentions, name="compiled decoder layers (between attentions)",
                                    dynamic=True)
compiled_last = compile_or_eager(after_last_attention, name="compiled decoder layers (after the last attention)",
                                 dynamic=True)


class CompiledLayerParts:
    """What the decoder stack calls instead of its eager parts (llama.run_layers)."""

    pre = staticmethod(compiled_pre)
    between = staticmethod(compiled_between)
    last = staticmethod(compiled_last)

    @property
    def failed(self) -> bool:
        return any(part.failed for part in (compiled_pre, compiled_between, compiled_last))


def wants_compiled_layers(device: torch.device, dtype: torch.dtype, enabled: bool) -> bool:
    """enabled: the capability choice (capabilities.choose_cpu_paths) for this engine."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and enabled
