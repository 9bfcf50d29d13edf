"""CUDA graphs for decode steps.

At start-up the model's decode forward is captured once per batch size in `capture_sizes`, reading
its inputs from static buffers. A decode-only step of B sequences copies its inputs into those
buffers, pads to the smallest captured size >= B (padding rows store nothing: slot -1, and attend to
nothing: length 0) and replays; larger batches and steps with prefill run eagerly.
"""
from __future__ import annotations

import logging

import torch

from ..layers.context import ForwardContext, forward_context

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 16 up to max_num_seqs (at most 256)."""
    largest = min(max_num_seqs, 256)
    return sorted({s for s in [1, 2, 4, 8, *range(16, 257, 16)] if s < largest} | {largest})


class DecodeGraphs:
    def __init__(self, model, kv_layers, backend, device: torch.device, max_blocks_per_seq: int,
                 capture_sizes: list[int]):
        self.model = model
        self.kv_layers = kv_layers
        self.backend = backend
        self.capture_sizes = sorted(capture_sizes)
        max_bs = self.capture_sizes[-1]
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_bs,), -1, dtype=torch.int64, device=device)
        self.seq_lens = torch.zeros(max_bs, dtype=torch.int32, device=device)
        self.block_tables = torch.zeros(max_bs, max_blocks_per_seq, dtype=torch.int32, device=device)
        self.query_start_loc = torch.arange(max_bs + 1, dtype=torch.int32, device=device)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def _forward(self, batch_size: int) -> torch.Tensor:
        ctx = forward_context(
            positions=self.positions[:batch_size], slot_mapping=self.slot_mapping[:batch_size],
            query_start_loc=self.query_start_loc[:batch_size + 1], seq_lens=self.seq_lens[:batch_size],
            block_tables=self.block_tables[:batch_size], num_decodes=batch_size, backend=self.backend,
            kv_layers=self.kv_layers, rotary=self.model.rotary)
        return self.model(self.input_ids[:batch_size], ctx)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for size in reversed(self.capture_sizes):  # largest first: smaller ones reuse its pool
                self._forward(size)  # warm-up: compiles the kernels for this shape
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    hidden = self._forward(size)
                pool = graph.pool()
                self.graphs[size] = (graph, hidden)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        logger.info("captured decode CUDA graphs for batch sizes %s", self.capture_sizes)

    def can_run(self, num_decodes: int, num_seqs: int, num_tokens: int) -> bool:
        return num_decodes == num_seqs == num_tokens and 0 < num_seqs <= self.capture_sizes[-1]

    def run(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """A decode-only step (B rows, its context built by the runner) replayed from the smallest
        captured size >= B; returns hidden states [B, hidden]."""
        batch = input_ids.shape[0]
        size = next(s for s in self.capture_sizes if s >= batch)
        meta = ctx.attn_meta
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(ctx.positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        self.block_tables[:batch, :meta.block_tables.shape[1]].copy_(meta.block_tables)
        if size > batch:  # padding rows: store nothing, attend to nothing
            self.slot_mapping[batch:size].fill_(-1)
            self.seq_lens[batch:size].zero_()
        graph, hidden = self.graphs[size]
        graph.replay()
        return hidden[:batch]
