"""What attention needs to know about a step's batch: where each new token's K/V goes, where each
sequence's queries start, how long each context is and which blocks hold it.

A step's batch is one varlen batch: sequences [0, num_decodes) contribute one query token each, the
rest contribute prefill chunks (decodes first, as the scheduler orders them).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [T] int64: cache slot (block * block_size + offset) of each token; -1 = padding
    query_start_loc: torch.Tensor  # [B + 1] int32 on the device
    seq_lens: torch.Tensor  # [B] int32: context length after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32
    num_seqs: int
    num_decodes: int  # sequences [0, num_decodes) have exactly one query token
    max_seq_len: int
    max_query_len: int
    # Host copies, for loops over the (few) prefill sequences; empty under CUDA graphs.
    query_start_loc_host: list[int] = field(default_factory=list)
    seq_lens_host: list[int] = field(default_factory=list)
    # Host arrays of slot_mapping and block_tables, where the step was planned on the host (None under CUDA
    # graphs): a CPU backend computes its per-step state from these with numpy, not with small torch ops.
    slot_mapping_host: np.ndarray | None = None
    block_tables_host: np.ndarray | None = None
    # What the backend's prepare() computed once for all layers (its own typed state).
    backend_state: object = None

    @classmethod
    def build(cls, slot_mapping: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
              block_tables: torch.Tensor, num_decodes: int, query_start_loc_host: list[int] | None = None,
              seq_lens_host: list[int] | None = None, slot_mapping_host: np.ndarray | None = None,
              block_tables_host: np.ndarray | None = None) -> "AttentionMetadata":
        """The one constructor the engine uses (runner and CUDA graphs). Without host copies (a
        captured decode graph) the maxima are those of a decode: query length 1, context unknown (0)."""
        starts = query_start_loc_host or []
        lens = seq_lens_host or []
        return cls(slot_mapping=slot_mapping, query_start_loc=query_start_loc, seq_lens=seq_lens,
                   block_tables=block_tables, num_seqs=block_tables.shape[0], num_decodes=num_decodes,
                   max_seq_len=max(lens, default=0),
                   max_query_len=max((b - a for a, b in zip(starts, starts[1:])), default=1),
                   query_start_loc_host=list(starts), seq_lens_host=list(lens), slot_mapping_host=slot_mapping_host,
                   block_tables_host=block_tables_host)
