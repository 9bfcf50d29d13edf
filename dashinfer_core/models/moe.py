"""The mixture-of-experts block (Qwen2-MoE, Qwen3-MoE, Mixtral): a softmax top-k router, experts that
are gated SiLU MLPs, and Qwen2-MoE's sigmoid-gated shared expert.

Arithmetic follows transformers so fp32 output is token-identical: routing probabilities in fp32,
top-k (ties broken by torch.topk, as HF does), optional renormalisation, then each expert that got
tokens runs once on all of them (tokens sorted by expert: one matmul per active expert, no loop over
tokens) and its weighted output is added into the result in expert order. On CUDA the experts run in
one fused Triton kernel (dashinfer_kernels.fused_moe) over weights stacked [experts, ...].

Experts are ordinary (merged gate/up) Linears, so InstantQuant quantizes them and tensor parallel
splits each expert's intermediate size like a dense MLP's; the router and the shared-expert gate stay
in full precision and are replicated. One all-reduce per block under tensor parallel.
"""
from __future__ import annotations

import torch
from torch import nn

from ..distributed.parallel_state import TPGroup
from ..layers import use_triton_ops
from ..layers.linear import Linear
from .model_config import ModelConfig


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, tp: TPGroup, expert_cls):
        """expert_cls(cfg, dtype, tp, intermediate_size, reduce): the dense MLP class (llama.MLP)."""
        super().__init__()
        moe = cfg.moe
        self.tp = tp
        self.num_experts, self.top_k = moe.num_experts, moe.top_k
        self.norm_topk_prob = moe.norm_topk_prob
        self.weights_in_model_dtype = moe.weights_in_model_dtype
        self.gate = Linear(cfg.hidden_size, moe.num_experts, False, dtype)  # the router
        self.gate.keep_full_precision = True
        self.experts = nn.ModuleList(expert_cls(cfg, dtype, tp, moe.intermediate_size, reduce=False)
                                     for _ in range(moe.num_experts))
        # The experts' weights stacked [experts, ...] for the fused kernel; each expert's Linear holds
        # a view of its slice, so loading fills both. Dropped once the experts are quantized.
        first = self.experts[0]
        self.w13 = nn.Parameter(torch.empty(moe.num_experts, *first.gate_up_proj.weight.shape, dtype=dtype),
                                requires_grad=False)
        self.w2 = nn.Parameter(torch.empty(moe.num_experts, *first.down_proj.weight.shape, dtype=dtype),
                               requires_grad=False)
        for e, expert in enumerate(self.experts):
            expert.gate_up_proj.weight = nn.Parameter(self.w13[e], requires_grad=False)
            expert.down_proj.weight = nn.Parameter(self.w2[e], requires_grad=False)
        self.shared_expert = self.shared_expert_gate = None
        if moe.shared_expert_intermediate_size:
            self.shared_expert = expert_cls(cfg, dtype, tp, moe.shared_expert_intermediate_size, reduce=False)
            self.shared_expert_gate = Linear(cfg.hidden_size, 1, False, dtype)
            self.shared_expert_gate.keep_full_precision = True

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k], expert ids [T, k]) of each token."""
        probs = torch.softmax(self.gate(x), dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights /= weights.sum(dim=-1, keepdim=True)
        return (weights.to(x.dtype) if self.weights_in_model_dtype else weights), experts

    def drop_stacked_experts(self) -> None:
        """The experts were replaced (quantized): the stacked copy is stale."""
        self.w13 = self.w2 = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        if self.w13 is not None and use_triton_ops(x):  # CUDA: the fused kernel, no host sync
            from dashinfer_kernels.fused_moe import fused_moe
            out = fused_moe(x, self.w13, self.w2, weights, experts)
        else:
            out = self._dispatch(x, weights, experts)
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return self.tp.all_reduce(out)

    def _dispatch(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        flat = experts.flatten()
        order = torch.argsort(flat, stable=True)  # (token, slot) pairs grouped by expert, tokens in order
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()  # one host read per block
        flat_weights = weights.flatten()
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            pairs = order[start:start + count]
            start += count
            tokens = pairs // self.top_k
            y = self.experts[expert](x[tokens]) * flat_weights[pairs, None]
            out.index_add_(0, tokens, y.to(out.dtype))
        return out
