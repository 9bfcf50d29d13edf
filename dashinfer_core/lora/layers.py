"""LoRA on the model's projections: every qkv/o/gate_up/down Linear is wrapped by a LoRALinear that
adds, to each token's base output, its adapter's x @ A^T @ B^T (B pre-scaled). Adapters sit in
`max_loras` device slots: each wrapped layer holds A [slots, shards*R, in] and B [slots, out, R]
(R = max_lora_rank; a merged layer's shards (q|k|v, gate|up) are shrunk together and each expanded
into its own rows; a smaller rank is zero-padded).

The step's token -> slot mapping (LoRABatch) is built once per step and read by every layer. On the
CPU the tokens with an adapter are gathered sorted by slot and either run as one padded bmm per
layer (decode-like steps: many short segments) or as two matmuls per active adapter (long prefill
segments, where padding would waste work); never a Python loop over rows. On CUDA the Triton
shrink/expand kernels (kernels/lora.py) read the mapping directly.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .adapter import TARGETS, LoRAAdapter

WRAPPED = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# our layer -> the HF projection of each of its shards
SHARD_MODULES = {layer: tuple(m for m, (target, _) in TARGETS.items() if target == layer) for layer in WRAPPED}


LONG_RUN = 16  # tokens: a run of one adapter this long (a prefill chunk) is computed in place


@dataclass
class LoRABatch:
    """One step's tokens grouped by adapter slot (every tensor on the model's device, except `runs`).
    Long runs of consecutive tokens with one adapter (prefill chunks) are computed on views of the
    step's activations; the other tokens with an adapter (decodes) are gathered, sorted by slot."""
    token_slots: torch.Tensor  # [T] int32, -1: base model only (also padding tokens)
    runs: list[tuple[int, int, int]]  # (slot, start, end): long runs, token indices
    perm: torch.Tensor  # [N] int64: the other tokens that have an adapter, sorted by slot
    segments: list[tuple[int, int, int]]  # (slot, start, end) into perm
    # Padded layout of perm (None: segment by segment): the tokens of each slot as [slots, L] (pads ->
    # token 0) and a [slots, L, 1] mask that zeroes the pads' shrink output, so they add exact zeros.
    padded_index: torch.Tensor | None = None
    padded_mask: torch.Tensor | None = None

    @classmethod
    def build(cls, token_slots: np.ndarray, num_slots: int, device: torch.device, dtype: torch.dtype) -> "LoRABatch":
        change = np.flatnonzero(np.diff(token_slots)) + 1
        starts, ends = np.r_[0, change], np.r_[change, len(token_slots)]
        runs, gathered = [], np.ones(len(token_slots), dtype=bool)
        for start, end in zip(starts.tolist(), ends.tolist()):
            slot = int(token_slots[start])
            if slot >= 0 and end - start >= LONG_RUN:
                runs.append((slot, start, end))
                gathered[start:end] = False
        rest = np.flatnonzero(gathered & (token_slots >= 0))
        perm = rest[np.argsort(token_slots[rest], kind="stable")]
        segments, start = [], 0
        for slot, count in zip(*np.unique(token_slots[perm], return_counts=True)):
            segments.append((int(slot), start, start + int(count)))
            start += int(count)
        padded_index = padded_mask = None
        longest = max((e - s for _, s, e in segments), default=0)
        if segments and num_slots * longest <= 2 * len(perm) + 64:  # little padding: one bmm per layer
            index = np.zeros((num_slots, longest), dtype=np.int64)
            mask = np.zeros((num_slots, longest, 1), dtype=np.float32)
            for slot, s, e in segments:
                index[slot, :e - s] = perm[s:e]
                mask[slot, :e - s] = 1.0
            padded_index = torch.from_numpy(index).to(device)
            padded_mask = torch.from_numpy(mask).to(device=device, dtype=dtype)
        return cls(torch.from_numpy(token_slots.astype(np.int32)).to(device), runs, torch.from_numpy(perm).to(device),
                   segments, padded_index, padded_mask)

    @property
    def num_lora_tokens(self) -> int:
        return int(self.perm.shape[0]) + sum(e - s for _, s, e in self.runs)


def lora_delta_ref(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, token_slots: torch.Tensor,
                   shard_sizes: tuple[int, ...]) -> torch.Tensor:
    """Row by row: what each token's adapter adds (the reference for every path)."""
    rank = b.shape[2]
    out = torch.zeros(x.shape[0], b.shape[1], dtype=x.dtype, device=x.device)
    for t, slot in enumerate(token_slots.tolist()):
        if slot >= 0:
            shrunk, row = a[slot] @ x[t], 0
            for j, size in enumerate(shard_sizes):
                out[t, row:row + size] = b[slot, row:row + size] @ shrunk[j * rank:(j + 1) * rank]
                row += size
    return out


def _shards(shard_sizes: tuple[int, ...], rank: int):
    """(columns of the shrunk activations, output rows) of each shard of a merged layer."""
    row = 0
    for j, size in enumerate(shard_sizes):
        yield slice(j * rank, (j + 1) * rank), slice(row, row + size)
        row += size


def add_lora(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, batch: LoRABatch,
             shard_sizes: tuple[int, ...]) -> torch.Tensor:
    """y [T, out] += each token's adapter delta, in place; returns y. A [slots, shards*R, in] shrinks all
    shards at once; B [slots, out, R] expands each shard's R columns into that shard's rows."""
    rank = b.shape[2]
    if x.is_cuda:
        from dashinfer_kernels.lora import lora_expand, lora_shrink
        shrunk = lora_shrink(x, a, batch.token_slots)
        for cols, rows in _shards(shard_sizes, rank):
            lora_expand(shrunk[:, cols], b[:, rows], batch.token_slots, y[:, rows])
        return y
    for slot, start, end in batch.runs:  # in place on views: no gather, no scatter
        shrunk = x[start:end] @ a[slot].T
        for cols, rows in _shards(shard_sizes, rank):
            y[start:end, rows].addmm_(shrunk[:, cols], b[slot, rows].T)
    if not batch.segments:
        return y
    if batch.padded_index is not None:
        num_slots, longest = batch.padded_index.shape
        index = batch.padded_index.view(-1)  # pads point at token 0 and add exact zeros to it
        shrunk = torch.bmm(x.index_select(0, index).view(num_slots, longest, -1), a.transpose(1, 2))
        shrunk *= batch.padded_mask
        parts = [torch.bmm(shrunk[:, :, cols], b[:, rows].transpose(1, 2)) for cols, rows in _shards(shard_sizes, rank)]
        delta = parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
        return y.index_add_(0, index, delta.view(num_slots * longest, -1))
    xs = x.index_select(0, batch.perm)
    delta = torch.empty(xs.shape[0], y.shape[1], dtype=y.dtype, device=y.device)
    for slot, start, end in batch.segments:
        shrunk = xs[start:end] @ a[slot].T
        for cols, rows in _shards(shard_sizes, rank):
            delta[start:end, rows] = shrunk[:, cols] @ b[slot, rows].T
    return y.index_add_(0, batch.perm, delta)


class LoRAStep:
    """What every LoRALinear of a model shares: the current step's batch (None: no adapter rows)."""

    def __init__(self):
        self.batch: LoRABatch | None = None


class LoRALinear(nn.Module):
    def __init__(self, base: nn.Module, layer_index: int, name: str, num_slots: int, max_rank: int,
                 step: LoRAStep):
        super().__init__()
        self.base = base  # a Linear, or the QuantizedLinear that replaces it
        self.layer_index = layer_index
        self.modules_of_shards = SHARD_MODULES[name]
        self.shard_sizes = base.shard_sizes
        self.shard_offsets = base.shard_offsets  # column-parallel: rows of each HF tensor on this rank
        self.in_offset = base.in_offset  # row-parallel: input columns on this rank
        self.max_rank = max_rank
        self.step = step
        n = len(self.modules_of_shards)
        dtype, device = base.weight.dtype, base.weight.device
        self.register_buffer("lora_a", torch.zeros(num_slots, n * max_rank, base.in_features, dtype=dtype,
                                                   device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, base.out_features, max_rank, dtype=dtype,
                                                   device=device), persistent=False)

    def load_slot(self, slot: int, adapter: LoRAAdapter | None) -> None:
        """Fill `slot` with this layer's part of `adapter` (zeros where it has none; None: clear)."""
        a, b = self.lora_a[slot], self.lora_b[slot]
        a.zero_()
        b.zero_()
        if adapter is None:
            return
        row = 0
        for shard, module in enumerate(self.modules_of_shards):
            size = self.shard_sizes[shard]
            pair = adapter.weights.get((self.layer_index, module))
            if pair is not None:
                a_full, b_full = pair
                r = a_full.shape[0]
                if self.in_offset is not None:  # row-parallel: this rank's input columns
                    a_full = a_full[:, self.in_offset:self.in_offset + a.shape[1]]
                if self.shard_offsets is not None:  # column-parallel: this rank's output rows
                    b_full = b_full[self.shard_offsets[shard]:self.shard_offsets[shard] + size]
                a[shard * self.max_rank:shard * self.max_rank + r].copy_(a_full)
                b[row:row + size, :r].copy_(b_full)
            row += size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        batch = self.step.batch
        if batch is None or batch.num_lora_tokens == 0:
            return y
        return add_lora(y, x, self.lora_a, self.lora_b, batch, self.shard_sizes)


class LoRASlots:
    """Every LoRALinear of one model, and the slot contents (which adapter uid is in which slot)."""

    def __init__(self, model: nn.Module, num_slots: int, max_rank: int):
        """The model's layers are already its tensor-parallel shard: each LoRALinear slices the adapters
        as its base layer is sliced (shard_offsets, in_offset)."""
        self.num_slots = num_slots
        self.step = LoRAStep()
        self.layers: list[LoRALinear] = []
        self.slot_uids: list[int | None] = [None] * num_slots
        for layer_index, layer in enumerate(model.layers):
            for parent, name in ((layer.self_attn, "qkv_proj"), (layer.self_attn, "o_proj"),
                                 (layer.mlp, "gate_up_proj"), (layer.mlp, "down_proj")):
                base = getattr(parent, name, None)
                if base is None:  # an MoE block: no LoRA on experts (the adapter loader refuses them)
                    continue
                wrapped = LoRALinear(base, layer_index, name, num_slots, max_rank, self.step)
                setattr(parent, name, wrapped)
                self.layers.append(wrapped)

    def load(self, slot: int, uid: int, adapter: LoRAAdapter) -> None:
        for layer in self.layers:
            layer.load_slot(slot, adapter)
        self.slot_uids[slot] = uid

    def prepare_step(self, loads: list, token_slots: np.ndarray | None, device: torch.device,
                     dtype: torch.dtype) -> None:
        """Before a forward: copy newly assigned adapters into their slots, then group the tokens."""
        for slot, uid, adapter in loads:
            self.load(slot, uid, adapter)
        self.step.batch = None if token_slots is None else LoRABatch.build(token_slots, self.num_slots, device, dtype)
