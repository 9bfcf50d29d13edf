"""CPU, half precision: the decoder layers' work around attention (norms, projections, RoPE, SiLU-mul,
residual adds) as torch.compile'd graphs, so a step pays one call per part instead of ~35 eager ops
each: the first layer's part before attention, then one graph from each attention to the next (layer
i's part after it joined with layer i + 1's before), and the last layer's part after attention with the
final norm. At batch 1 the step is dominated by that per-op dispatch: on the dev machine a bf16 +
iq-int8 decode step went from 16.7 to 13.8 ms with a graph per part, fewer calls since.

Not used in fp32, where the eager ops keep results bit-identical to HF transformers (inductor fuses
the RMSNorm reductions in another order), nor with enforce_eager. In a step of decodes only whose
contexts fit one attention bucket, the attention runs inside the graphs too (decode_between), two layers
a graph (decode_two: 17 calls a step instead of 31 on a 30-layer model; one process alternating both every 4
steps on a 2-core AMX Xeon, bf16: batch 1 31.6 -> 29.9 ms and 32.9 -> 31.0, batch 64 84.3 -> 82.7; GGUF int4
batch 1 16.2 -> 15.9 and 17.0 -> 16.5); other steps call the attention backend between the graphs.
"""
from __future__ import annotations

import types
from dataclasses import dataclass

import torch

from ..compiling import CompiledOrEager, compile_or_eager
from ..layers.attention.torch_backend import (FUSED_MULTIPLY_ADD, DecodeBucket, TorchAttention, TorchStepState,
                                              compiled_decode, gathered_decode_attention, mark_dynamic, store_kv,
                                              write_kv_rows)
from ..layers.context import ForwardContext
from .llama import DecoderLayer


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


# A step of decodes only (most steps) takes the attention into the graphs too: from layer i's attention
# to layer i + 1's, read from the paged cache as torch_backend.fused_decode does, the new K/V stored before
# each graph. Compiled like fused_decode: static head shapes (so the inner loops vectorize), the batch and
# context sizes marked dynamic on each call.
def decode_attention(layer: DecoderLayer, q, kv, blocks, bias, keys_transposed: bool):
    """q: [n, Hq, D] (one query per sequence); kv: the layer's KVLayer.data [2, blocks, Hkv, block_size, D]
    (keys_transposed: its KVLayer's); blocks, bias: the step's one DecodeBucket's -> [n, Hq, D] in q's dtype."""
    n, num_heads, head_dim = q.shape
    num_kv_heads = kv.shape[2]
    queries = q.float().view(n, num_kv_heads, num_heads // num_kv_heads, head_dim)
    return gathered_decode_attention(queries, kv, blocks, bias, layer.self_attn.scale, keys_transposed).to(
        q.dtype).view(n, num_heads, head_dim)


def decode_between(layer: DecoderLayer, next_layer: DecoderLayer, q, kv, blocks, bias, residual, positions,
                   cos_sin, rotary, keys_transposed: bool):
    return between_attentions(layer, next_layer, decode_attention(layer, q, kv, blocks, bias, keys_transposed),
                              residual, positions, cos_sin, rotary)


def decode_last(layer: DecoderLayer, norm, q, kv, blocks, bias, residual, keys_transposed: bool):
    return after_last_attention(layer, norm, decode_attention(layer, q, kv, blocks, bias, keys_transposed), residual)


# Two layers a graph: the K/V of the middle layer is stored inside it, by an operator that declares the cache
# it writes (inductor then writes it in place; the same index_copy_ traced into the graph copied the whole
# pool: 40 ms against 32 us), so a step makes half the compiled calls (each ~100 us of dynamo guards and
# wrappers besides its kernels at batch 1).
_LIBRARY = torch.library.Library("dashinfer", "FRAGMENT")
_LIBRARY.define("store_kv_rows(Tensor(a!) data, Tensor rows, Tensor k, Tensor v, Tensor? key_chunks, "
                "Tensor? key_offsets) -> ()")


_LIBRARY.impl("store_kv_rows", write_kv_rows, "CPU")
torch.library.register_fake("dashinfer::store_kv_rows", lambda data, rows, k, v, key_chunks, key_offsets: None,
                            lib=_LIBRARY)


def decode_two(layer: DecoderLayer, middle: DecoderLayer, next_layer: DecoderLayer, q, kv, middle_kv, store_rows,
               key_chunks, key_offsets, blocks, bias, residual, positions, cos_sin, rotary, keys_transposed: bool):
    q, k, v, residual = decode_between(layer, middle, q, kv, blocks, bias, residual, positions, cos_sin, rotary,
                                       keys_transposed)
    torch.ops.dashinfer.store_kv_rows(middle_kv, store_rows, k, v, key_chunks, key_offsets)
    return decode_between(middle, next_layer, q, middle_kv, blocks, bias, residual, positions, cos_sin, rotary,
                          keys_transposed)


# The parts, each with its compile settings: token counts dynamic in the parts around an attention outside the
# graphs (1, a single decode, gets its own graph); the decode parts compiled like fused_decode (static head shapes,
# so the inner loops vectorize; batch and context sizes marked dynamic on each call). They are pure functions of
# their inputs, so after a compile failure (no C++ compiler, an unsupported op) eager gives the same.
PARTS = {"pre": (DecoderLayer.pre_attention, "decoder layers (pre-attention)", dict(dynamic=True)),
         "between": (between_attentions, "decoder layers (between attentions)", dict(dynamic=True)),
         "last": (after_last_attention, "decoder layers (after the last attention)", dict(dynamic=True)),
         "decode_between": (decode_between, "decode layers (between attentions)",
                            dict(dynamic=False, options=FUSED_MULTIPLY_ADD)),
         "decode_two": (decode_two, "decode layers (two layers)", dict(dynamic=False, options=FUSED_MULTIPLY_ADD)),
         "decode_last": (decode_last, "decode layers (after the last attention)",
                         dict(dynamic=False, options=FUSED_MULTIPLY_ADD))}


@dataclass
class LayerGraphs:
    """One compiled form of each part (PARTS)."""
    pre: CompiledOrEager
    between: CompiledOrEager
    last: CompiledOrEager
    decode_between: CompiledOrEager
    decode_two: CompiledOrEager
    decode_last: CompiledOrEager

    @classmethod
    def build(cls, tag: str | None = None, guarded: "LayerGraphs | None" = None) -> "LayerGraphs":
        """Without a tag: the parts as they are, every guard kept. With one: copies of the parts (new code objects:
        dynamo keeps a cache per code object) whose graphs skip dynamo's guards on the modules they are given. Those
        must be whole graphs: the code after a graph break is one function for every copy (dynamo's resume
        functions), so a part that breaks falls back to its form in `guarded` for good."""
        parts = {}
        for name, (fn, what, options) in PARTS.items():
            fallback = None
            if tag is not None:
                fn = types.FunctionType(fn.__code__.replace(co_name=f"{fn.__code__.co_name}_{tag}"), fn.__globals__,
                                        fn.__name__, fn.__defaults__, fn.__closure__)
                skip_module_guards = torch.compiler.skip_guard_on_all_nn_modules_unsafe
                options = {**options, "fullgraph": True,
                           "options": {**options.get("options", {}), "guard_filter_fn": skip_module_guards}}
                fallback = getattr(guarded, name)
            parts[name] = compile_or_eager(fn, name=f"compiled {what}" + (f" ({tag})" if tag else ""),
                                           fallback=fallback, **options)
        return cls(**parts)

    @property
    def failed(self) -> bool:
        """A part runs eagerly (its compile failed, and so did the guarded form it fell back to, if any)."""
        return any(part.failed and not (isinstance(part.fallback, CompiledOrEager) and part.fallback.active)
                   for part in vars(self).values())

    @property
    def fell_back(self) -> list[str]:
        """Parts whose whole-graph form failed (they run a guarded form, or eagerly): a graph break in the
        model's code."""
        return [part.name for part in vars(self).values() if part.failed]


# Dynamo guards every attribute of the layers a graph is given (~700 guard lines for a two-layer decode graph),
# checked at every call. Skipping them is sound only where every model that reaches the graphs has the same
# structure, so the graphs are kept per structure (structure_signature): one set for each kind of model a process
# runs, shared by its instances (weights are read at each call). A model whose layers differ from each other keeps
# the guarded graphs (GUARDED). GGUF int4, bf16, batch 1, 2-core AMD EPYC, one process alternating the two 8 times,
# median step: 13.23 -> 12.60 ms and 13.41 -> 13.07 ms; the same scores and tokens.
GUARDED = LayerGraphs.build()
_BY_STRUCTURE: dict[tuple, LayerGraphs] = {}


def graphs_for(layers, norm, rotary) -> LayerGraphs:
    layer_kinds = {structure_signature(layer, skip=("layer_index",)) for layer in layers}
    if len(layer_kinds) != 1:
        return GUARDED
    key = (layer_kinds.pop(), structure_signature(norm), structure_signature(rotary))
    graphs = _BY_STRUCTURE.get(key)
    if graphs is None:
        graphs = _BY_STRUCTURE[key] = LayerGraphs.build(f"s{len(_BY_STRUCTURE)}", GUARDED)
    return graphs


def structure_signature(module: torch.nn.Module, skip: tuple[str, ...] = ()) -> tuple:
    """What a graph traced through `module` may depend on besides its tensors' values: for every submodule its
    class and every attribute (plain values as they are, tensors by dtype, shape, strides and device, other objects
    by type and their own attributes), and the names of its children."""
    return tuple((name, _describe(type(mod)), tuple((key, _describe(value)) for key, value in sorted(vars(mod).items())
                                                    if key not in skip and key != "_modules"),
                  tuple(mod._modules))
                 for name, mod in module.named_modules())


def _describe(value, depth: int = 0):
    if isinstance(value, torch.Tensor):
        return ("tensor", value.dtype, tuple(value.shape), value.stride(), value.storage_offset(), value.device.type,
                value.requires_grad)
    if value is None or isinstance(value, (bool, int, float, str, bytes, torch.dtype, torch.device)):
        return value
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_describe(v, depth) for v in value))
    if isinstance(value, (set, frozenset)):
        return ("set", tuple(sorted(map(repr, value))))
    if isinstance(value, dict):
        return ("dict", tuple((repr(k), _describe(v, depth)) for k, v in value.items()))
    if isinstance(value, type) or (callable(value) and hasattr(value, "__qualname__")):
        return ("code", getattr(value, "__module__", None), value.__qualname__)
    if isinstance(value, torch.nn.Module):  # (children are described where named_modules reaches them)
        return ("module", type(value).__qualname__)
    if depth < 2 and hasattr(value, "__dict__"):  # e.g. the tensor-parallel group
        return ("object", _describe(type(value)), _describe(vars(value), depth + 1))
    return ("object", _describe(type(value)), repr(value))


def decode_bucket(ctx: ForwardContext) -> DecodeBucket | None:
    """The step's one bucket when every token is a decode answered in place by the compiled decode attention
    (TorchAttention's fused path, unquantized cache), else None."""
    state = ctx.attn_meta.backend_state
    if not isinstance(ctx.backend, TorchAttention) or not ctx.backend.fused or not isinstance(state, TorchStepState) \
            or len(state.buckets) != 1 or state.long_prefills or ctx.kv_layers[0].bits is not None \
            or not compiled_decode.active:
        return None
    bucket = state.buckets[0]
    return bucket if bucket.token_idx is None and bucket.bias.shape[0] == ctx.positions.shape[0] else None


class CompiledLayerParts:
    """What the decoder stack runs instead of its eager layers (llama.run_layers). Made for a model once its weights
    are final (loaded, quantized, packed): the graphs are chosen by its structure."""

    decode_in_graph = True  # False: every step's attention outside the graphs (tests compare both routes)
    two_layers_a_graph = True  # False: one layer a graph in decode steps too (A/B timing, tests)

    def __init__(self, model: torch.nn.Module):
        self.graphs = graphs_for(model.layers, model.norm, model.rotary)

    @property
    def failed(self) -> bool:
        return self.graphs.failed

    @property
    def fell_back(self) -> list[str]:
        return self.graphs.fell_back

    def run(self, layers, norm, x: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        positions, cos_sin, rotary, graphs = ctx.positions, ctx.cos_sin, ctx.rotary, self.graphs
        bucket = decode_bucket(ctx) if self.decode_in_graph and cos_sin is not None else None
        if bucket is not None:
            mark_dynamic((bucket.blocks, (0, 1)), (bucket.bias, (0, 1)), (positions, (0,)), (cos_sin[0], (0,)),
                          (cos_sin[1], (0,)))
        q, k, v, residual = graphs.pre(layers[0], x, None, positions, cos_sin, rotary)
        if bucket is not None:
            return self._decode(layers, norm, q, k, v, residual, ctx, bucket)
        for i, layer in enumerate(layers):
            out = ctx.backend.forward(q, k, v, ctx.kv_layers[layer.layer_index], ctx.attn_meta, layer.self_attn.scale)
            if i + 1 == len(layers):
                return graphs.last(layer, norm, out, residual)
            q, k, v, residual = graphs.between(layer, layers[i + 1], out, residual, positions, cos_sin, rotary)

    def _decode(self, layers, norm, q, k, v, residual, ctx: ForwardContext, bucket: DecodeBucket) -> torch.Tensor:
        """A step of decodes only: two layers a graph while at least three remain (the third's part before its
        attention closes the graph), then one."""
        positions, cos_sin, rotary, graphs = ctx.positions, ctx.cos_sin, ctx.rotary, self.graphs
        state = ctx.attn_meta.backend_state
        kv = [ctx.kv_layers[layer.layer_index].data for layer in layers]
        keys_transposed = ctx.kv_layers[0].keys_transposed
        key_chunks, key_offsets = state.key_store or (None, None)
        if key_chunks is not None:
            mark_dynamic((key_chunks, (0,)), (key_offsets, (0,)))
        i = 0
        while True:
            store_kv(k, v, ctx.kv_layers[layers[i].layer_index], state)
            mark_dynamic((q, (0,)), (residual, (0,)), (kv[i], (1,)))
            if i + 1 == len(layers):
                return graphs.decode_last(layers[i], norm, q, kv[i], bucket.blocks, bucket.bias, residual,
                                          keys_transposed)
            if self.two_layers_a_graph and i + 2 < len(layers) and state.token_idx is None:
                mark_dynamic((kv[i + 1], (1,)), (state.store_rows, (0,)))
                q, k, v, residual = graphs.decode_two(layers[i], layers[i + 1], layers[i + 2], q, kv[i], kv[i + 1],
                                                      state.store_rows, key_chunks, key_offsets, bucket.blocks,
                                                      bucket.bias, residual, positions, cos_sin, rotary,
                                                      keys_transposed)
                i += 2
                continue
            q, k, v, residual = graphs.decode_between(layers[i], layers[i + 1], q, kv[i], bucket.blocks, bucket.bias,
                                                      residual, positions, cos_sin, rotary, keys_transposed)
            i += 1


def wants_compiled_layers(device: torch.device, dtype: torch.dtype, enabled: bool) -> bool:
    """enabled: the capability choice (capabilities.choose_cpu_paths) for this engine."""
    return device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and enabled
