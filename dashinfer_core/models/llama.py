"""The Llama family in one file: Llama 2/3, Mistral, SmolLM2, Qwen2/2.5 (q/k/v biases) and Qwen3
(per-head q/k RMSNorm), and their mixture-of-experts forms Qwen2-MoE, Qwen3-MoE and Mixtral (moe.py
replaces the MLP of the sparse layers). Decoder-only, pre-norm, GQA, rotary embeddings, gated SiLU MLP.

The forward takes one flattened varlen batch (`input_ids` [T]) and the step's ForwardContext
(positions, attention metadata and backend, the KV cache layers, rotary inputs), writes K/V into the
paged cache and returns hidden states [T, hidden]; `compute_logits` projects only the rows that will
sample.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..distributed.parallel_state import SINGLE, TPGroup
from ..errors import UnsupportedModelError
from ..layers.activation import silu_and_mul
from ..layers.context import ForwardContext
from ..layers.linear import Linear, linear, packed_linear, packed_parameter
from ..layers.norm import RMSNorm
from ..layers.rotary import RotaryEmbedding
from ..quant.gptq import GPTQ_PARTS, check_gptq_config, install_gptq
from ..quant.weights import QuantizedWeight
from .model_config import ModelConfig
from .moe import MoE

PACKED_HEAD_CHUNK_BYTES = 16 << 20  # well under glibc's largest mmap threshold (32 MiB)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup):
        super().__init__()
        # Tensor parallel: this rank's query heads and the KV heads they read (column-parallel q/k/v,
        # row-parallel o); one rank holds them all by default.
        first_head, self.num_heads = tp.q_head_shard(cfg.num_heads, cfg.num_kv_heads)
        first_kv_head, self.num_kv_heads = tp.kv_head_shard(cfg.num_kv_heads)
        self.head_dim = cfg.head_dim
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        parallel = tp.size > 1
        kv_offset = first_kv_head * self.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, q_size + 2 * kv_size, cfg.qkv_bias, dtype,
                               shard_sizes=(q_size, kv_size, kv_size),
                               shard_offsets=(first_head * self.head_dim, kv_offset, kv_offset) if parallel else None)
        self.o_proj = Linear(q_size, cfg.hidden_size, cfg.o_bias, dtype,
                             in_offset=first_head * self.head_dim if parallel else None, first_rank=tp.rank == 0)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.scale = self.head_dim ** -0.5

    def qkv(self, x, positions, cos_sin, rotary: RotaryEmbedding):
        """Projected and rotated q, k, v (cos_sin: see ForwardContext)."""
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split(self.qkv_proj.shard_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = rotary.rotate(q, k, positions, cos_sin)
        return q, k, v


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup, intermediate_size: int | None = None,
                 reduce: bool = True):
        """intermediate_size: default cfg's (an MoE expert has its own); reduce: sum the row-parallel
        output across ranks here (an MoE block sums its experts first, then reduces once)."""
        super().__init__()
        self.tp = tp
        self.reduce = reduce
        start, inter = tp.shard(intermediate_size or cfg.intermediate_size)
        parallel = tp.size > 1
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * inter, cfg.mlp_bias, dtype, shard_sizes=(inter, inter),
                                   shard_offsets=(start, start) if parallel else None)
        self.down_proj = Linear(inter, cfg.hidden_size, cfg.mlp_bias, dtype, in_offset=start if parallel else None,
                                first_rank=tp.rank == 0)

    def forward(self, x):
        out = self.down_proj(silu_and_mul(self.gate_up_proj(x)))
        return self.tp.all_reduce(out) if self.reduce else out


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, layer_index: int, tp: TPGroup):
        super().__init__()
        self.layer_index = layer_index  # which of ForwardContext.kv_layers is this layer's cache
        self.tp = tp
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(cfg, dtype, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # GLM-4: each sublayer's output is normed before its residual add.
        self.post_self_attn_layernorm = self.post_mlp_layernorm = None
        if cfg.post_sublayer_norms:
            self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
            self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        sparse = cfg.moe is not None and layer_index in cfg.moe.sparse_layers
        self.mlp = MoE(cfg, dtype, tp, MLP) if sparse else MLP(cfg, dtype, tp)

    # The layer in three parts: attention over the paged cache between two pure tensor functions,
    # which models/compiled.py can hand to torch.compile.
    def pre_attention(self, x, residual, positions, cos_sin, rotary):
        if residual is None:
            residual = x
            h = self.input_layernorm(x)
        else:
            h, residual = self.input_layernorm(x, residual)
        q, k, v = self.self_attn.qkv(h, positions, cos_sin, rotary)
        return q, k, v, residual

    def post_attention(self, out, residual):
        h = self.tp.all_reduce(self.self_attn.o_proj(out.reshape(out.shape[0], -1)))
        if self.post_self_attn_layernorm is not None:
            h = self.post_self_attn_layernorm(h)
        h, residual = self.post_attention_layernorm(h, residual)
        h = self.mlp(h)
        if self.post_mlp_layernorm is not None:
            h = self.post_mlp_layernorm(h)
        return h, residual

    def forward(self, x, residual, ctx: ForwardContext):
        q, k, v, residual = self.pre_attention(x, residual, ctx.positions, ctx.cos_sin, ctx.rotary)
        out = ctx.backend.forward(q, k, v, ctx.kv_layers[self.layer_index], ctx.attn_meta, self.self_attn.scale)
        return self.post_attention(out, residual)


def run_layers(layers, norm: RMSNorm, x: torch.Tensor, ctx: ForwardContext, parts=None) -> torch.Tensor:
    """The decoder stack and the final norm over embeddings x. parts: a CompiledLayerParts (models/compiled.py),
    whose graphs run from each attention to the next, or None: eager."""
    if parts is not None:
        return parts.run(layers, norm, x, ctx)
    residual = None
    for layer in layers:
        x, residual = layer(x, residual, ctx)
    return norm(x, residual)[0]


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, max_positions: int, tp: TPGroup = SINGLE):
        """tp: the tensor-parallel group this model is a shard of (one rank by default)."""
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"hidden_act {cfg.hidden_act!r} is not supported (only 'silu')")
        self.cfg = cfg
        self.tp = tp
        # Vocab-parallel embedding and LM head: this rank's rows of the vocabulary.
        self.vocab_start, self.vocab_local = tp.shard(cfg.vocab_size)
        self.embed_tokens = nn.Parameter(torch.empty(self.vocab_local, cfg.hidden_size, dtype=dtype),
                                         requires_grad=False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, dtype, i, tp) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.lm_head = None if cfg.tie_word_embeddings else nn.Parameter(
            torch.empty(self.vocab_local, cfg.hidden_size, dtype=dtype), requires_grad=False)
        self.rotary = RotaryEmbedding(cfg.head_dim, max_positions, cfg.rope_theta, cfg.rope_scaling, dtype,
                                      cfg.rotary_dim, cfg.rotary_interleaved, cfg.mrope_section)
        self.compiled_parts = None  # set by the runner where compiling the layers pays (CPU, half precision)
        # A GGUF checkpoint's quantized embedding and LM head (QuantizedLinear; the same one when tied), kept
        # as they are: rows dequantized on lookup, the logits from the quantized matmul.
        self.embed_quant = None
        self.logits_quant = None
        self.packed_head = False  # pack_weights(): the LM head's product reads a packed copy

    def pack_weights(self) -> None:
        """CPU, bf16 or fp32 (the packed_linear fast path): every plain projection's weight, and the LM head's, reordered
        once into oneDNN's layout (layers/linear.py); the plain copies are dropped. A tied LM head stays as it is:
        the embedding lookup needs its rows, and a packed copy beside them would raise the peak memory."""
        for module in self.modules():
            if isinstance(module, Linear) and not module.packed:
                module.pack()
        if self.logits_quant is None and self.lm_head is not None and not self.packed_head:
            self.lm_head = packed_parameter(self.lm_head)
            self.packed_head = True

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.embed_quant is not None:
            return self.embed_quant.rows(input_ids)
        if self.tp.size == 1:
            return F.embedding(input_ids, self.embed_tokens)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.vocab_local)
        x = F.embedding(local.masked_fill(outside, 0), self.embed_tokens).masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(x)

    def forward(self, input_ids, ctx: ForwardContext):
        return run_layers(self.layers, self.norm, self.embed(input_ids), ctx, self.compiled_parts)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """out: a [rows, vocab] tensor to write into (one rank, unquantized LM head; ignored otherwise)."""
        if self.logits_quant is not None:
            return self.logits_quant(hidden)
        weight = self.embed_tokens if self.lm_head is None else self.lm_head
        fits = out is not None and self.tp.size == 1 and out.shape == (hidden.shape[0], weight.shape[0])
        if self.packed_head and fits:
            # oneDNN's packed product has no out=: it runs on row chunks whose outputs glibc serves from its heap,
            # copied into `out` (one [256, 49152] output was mapped afresh and faulted in every step: the tiny
            # model's LM head 39-45 -> 23-29 ms a step at 256 rows, 2 threads, an AVX2-only EPYC)
            rows = max(1, PACKED_HEAD_CHUNK_BYTES // (weight.shape[0] * out.element_size()))
            for start in range(0, hidden.shape[0], rows):
                out[start:start + rows].copy_(packed_linear(hidden[start:start + rows], weight))
            return out
        if self.packed_head:
            return self.tp.all_gather_last_dim(packed_linear(hidden, weight))
        if fits:
            return torch.mm(hidden, weight.t(), out=out)
        return self.tp.all_gather_last_dim(linear(hidden, weight))

    # ---- weights -------------------------------------------------------------------------------
    # HF projection name -> (our merged layer, shard index)
    _SHARDS = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
               "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    # Mixtral's HF names -> the Qwen-MoE layout this model uses (mlp.experts.N.{gate,up,down}_proj).
    _MIXTRAL_NAMES = ((".block_sparse_moe.", ".mlp."), (".w1.", ".gate_proj."), (".w3.", ".up_proj."),
                      (".w2.", ".down_proj."))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Fill parameters from HF-named tensors; raises on unknown or missing names."""
        loaded: set[tuple[str, str, int]] = set()
        gptq: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # (layer path, shard) -> GPTQ tensors
        quantized: dict[tuple[str, int], QuantizedWeight] = {}  # (layer path, shard) -> GGUF blocks as they are
        mixtral = self.cfg.architecture == "MixtralForCausalLM"
        for name, tensor in weights:
            if mixtral and ".block_sparse_moe." in name:
                for old, new in self._MIXTRAL_NAMES:
                    name = name.replace(old, new)
            if "rotary_emb.inv_freq" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue  # derived buffers, or a stored copy of tied embeddings
            if name in ("model.embed_tokens.weight", "lm_head.weight") and isinstance(tensor, QuantizedWeight):
                self._install_quantized_vocab(name, tensor)
                loaded.add((name, "weight", 0))
                continue
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                param = self.embed_tokens if name.startswith("model.") else self.lm_head
                _copy_checked(name, param, tensor[self.vocab_start:self.vocab_start + self.vocab_local])
                loaded.add((name, "weight", 0))
                continue
            parts = name.split(".")
            if parts[0] != "model" or len(parts) < 3:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            module_path, kind = parts[1:-1], parts[-1]
            shard = 0
            if module_path[-1] in self._SHARDS:
                module_path[-1], shard = self._SHARDS[module_path[-1]]
            module = self.get_submodule(".".join(module_path)) if _has_module(self, module_path) else None
            if isinstance(module, Linear) and module_path[-1] == "gate_up_proj" and kind in ("weight", "bias") \
                    and name.endswith(f"gate_up_proj.{kind}"):  # GLM stores gate|up merged: one shard each
                for part_index, part in enumerate(tensor.chunk(2, dim=0)):
                    module.load(kind, part, part_index)
                    loaded.add((".".join(module_path), kind, part_index))
                continue
            if isinstance(module, Linear) and isinstance(tensor, QuantizedWeight) and kind == "weight":
                quantized[(".".join(module_path), shard)] = tensor
            elif isinstance(tensor, QuantizedWeight):
                raise ValueError(f"{name}: a quantized tensor where a dense one belongs")
            elif isinstance(module, Linear) and kind in GPTQ_PARTS:
                gptq.setdefault((".".join(module_path), shard), {})[kind] = tensor
                kind = "weight"  # the quantized tensors stand for the weight
            elif isinstance(module, Linear):
                module.load(kind, tensor, shard)
            elif isinstance(module, RMSNorm) and kind == "weight":
                _copy_checked(name, module.weight, tensor)
            else:
                raise ValueError(f"unexpected weight {name!r} in checkpoint")
            loaded.add((".".join(module_path), kind, shard))
        missing = sorted(self._expected_weights() - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:3]}")
        if (gptq or quantized or self.embed_quant is not None) and self.tp.size > 1:
            raise UnsupportedModelError("tensor_parallel_size: GPTQ and GGUF checkpoints run with tensor_parallel_size 1")
        if gptq:
            install_gptq(self, gptq, check_gptq_config(self.cfg.raw.get("quantization_config") or {}))
        if quantized:
            from ..quant.linear import install_quantized
            install_quantized(self, quantized, "GGUF")

    def _install_quantized_vocab(self, name: str, qw: QuantizedWeight) -> None:
        from ..quant.linear import QuantizedLinear
        shape = (self.cfg.vocab_size, self.cfg.hidden_size)
        if qw.shape != shape:
            raise ValueError(f"{name}: checkpoint shape {qw.shape} != {shape}")
        dtype, device = self.norm.weight.dtype, self.norm.weight.device
        module = QuantizedLinear(qw, None, (shape[0],), dtype).to(device)
        if name == "lm_head.weight":
            self.lm_head = None
            self.logits_quant = module
        else:
            self.embed_tokens = None
            self.embed_quant = module
            if self.cfg.tie_word_embeddings:
                self.logits_quant = module

    def _expected_weights(self) -> set[tuple[str, str, int]]:
        expected = {("model.embed_tokens.weight", "weight", 0)}
        if self.lm_head is not None:
            expected.add(("lm_head.weight", "weight", 0))
        for path, module in self.named_modules():
            if isinstance(module, Linear):
                kinds = ["weight"] + (["bias"] if module.bias is not None else [])
                expected |= {(path, kind, s) for kind in kinds for s in range(len(module.shard_sizes))}
            elif isinstance(module, RMSNorm):
                expected.add((path, "weight", 0))
        return expected


def _has_module(root: nn.Module, path: list[str]) -> bool:
    try:
        root.get_submodule(".".join(path))
        return True
    except AttributeError:
        return False


def _copy_checked(name: str, param: torch.Tensor, tensor: torch.Tensor) -> None:
    if tuple(param.shape) != tuple(tensor.shape):
        raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != {tuple(param.shape)}")
    param.data.copy_(tensor)
