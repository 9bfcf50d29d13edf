"""Batched sampling on the device: penalties, greedy, temperature, min-p, top-k, top-p, logprobs.

Each sampled row draws its uniforms from a generator seeded by (sequence seed, output index), not
from a shared stream, so a seeded request draws the same numbers whatever batch it shares and after
a preemption and recompute. (A vectorised counter-based hash over the whole [rows, vocab] block was
6x slower on the CPU than one Philox draw per row.)
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

_MASK64 = (1 << 64) - 1


@dataclass
class SamplingTensors:
    """Per-row sampling parameters for the rows that sample this step."""
    greedy: torch.Tensor  # [S] bool
    temperature: torch.Tensor  # [S] float32 (1.0 on greedy rows)
    top_k: torch.Tensor  # [S] int64, vocab size when off
    top_p: torch.Tensor  # [S] float32
    min_p: torch.Tensor  # [S] float32
    seeds: list[int]  # per row
    steps: list[int]  # per row: index of the output token being drawn
    all_greedy: bool
    use_top_k: bool
    use_top_p: bool
    use_min_p: bool
    # Penalties (None when no row uses them).
    repetition_penalty: torch.Tensor | None = None  # [S]
    presence_penalty: torch.Tensor | None = None  # [S]
    frequency_penalty: torch.Tensor | None = None  # [S]
    prompt_and_output_ids: torch.Tensor | None = None  # [S, L] padded with vocab_size
    output_ids: torch.Tensor | None = None  # [S, L] padded with vocab_size
    # (row, token id) pairs that must not be sampled this step (EOS before min_tokens).
    banned_rows: torch.Tensor | None = None
    banned_tokens: torch.Tensor | None = None
    # Top logprobs to return: the largest count any row asked for; -1 = no row asked.
    num_logprobs: int = -1
    # Guided rows: packed allowed-token bitmasks [G, ceil(vocab / 32)] int32 and their rows [G].
    guided_bitmask: torch.Tensor | None = None
    guided_rows: torch.Tensor | None = None


@dataclass
class SamplerOutput:
    """The step's draws, one row per sampled sequence: device tensors from the sampler, Python lists
    after to_host() (the step's one device-to-host sync)."""
    token_ids: torch.Tensor | list[int]  # [S]; -1 = the row's logits were not finite
    logprobs: torch.Tensor | list[float] | None = None  # [S]: logprob of the sampled token
    top_logprobs: torch.Tensor | list[list[float]] | None = None  # [S, K]
    top_token_ids: torch.Tensor | list[list[int]] | None = None  # [S, K]

    def to_host(self) -> "SamplerOutput":
        def host(x):
            return None if x is None else x.tolist()
        return SamplerOutput(self.token_ids.tolist(), host(self.logprobs), host(self.top_logprobs),
                             host(self.top_token_ids))

    def logprobs_of_row(self, row: int, wanted: int | None) -> dict[int, float] | None:
        """{token: logprob} for row (host lists): the sampled token's, then up to `wanted` top ones."""
        if wanted is None or self.logprobs is None:
            return None
        entry = {self.token_ids[row]: self.logprobs[row]}
        if wanted > 0:
            for tok, lp in zip(self.top_token_ids[row][:wanted], self.top_logprobs[row][:wanted]):
                entry.setdefault(tok, lp)
        return entry


class Sampler:
    """Turns the sampling parameters of a step's rows into tensors (prepare) and draws their tokens
    from the logits (__call__)."""

    def __init__(self, vocab_size: int = 0, eos_token_ids: tuple[int, ...] = (), device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.eos_token_ids = list(eos_token_ids)
        self.device = torch.device(device)
        self._generators: dict[torch.device, torch.Generator] = {}
        # (row seq ids, their fixed tensors, whether rows need per-step work)
        self._fixed: tuple | None = None

    def prepare(self, seqs: list) -> SamplingTensors:
        """The per-row tensors for drawing the next token of each of `seqs` (engine Sequences). The part
        fixed by the rows' parameters is built once per set of rows (most steps draw for the same running
        set as the step before); what moves with the tokens (steps, penalties, masks) is built each time."""
        key = tuple(s.seq_id for s in seqs)
        if self._fixed is None or self._fixed[0] != key:
            params = [s.params for s in seqs]
            # (a triggered pattern may start or end on any step: such rows are looked at every step)
            per_step = any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty or p.min_tokens
                           or p.triggered_spec is not None for p in params) or any(s.guided is not None for s in seqs)
            self._fixed = (key, self._fixed_tensors(seqs), per_step)
        fixed = self._fixed[1]
        if not self._fixed[2] and fixed.all_greedy:  # nothing moves with the tokens: the fixed tensors as they are
            return fixed
        t = dataclasses.replace(fixed, steps=[s.num_output_tokens for s in seqs])
        if not self._fixed[2]:  # no penalties, guided rows or min_tokens among these rows
            return t
        params = [s.params for s in seqs]
        vocab, dev = self.vocab_size, self.device
        if any(p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params):
            self._add_penalties(t, seqs)
        guided = [(i, s.guided) for i, s in enumerate(seqs) if s.guided is not None]
        if guided:
            bitmask = torch.zeros(len(guided), -(-vocab // 32), dtype=torch.int32)
            for j, (_, state) in enumerate(guided):
                state.write_mask(bitmask[j])
            t.guided_bitmask = bitmask.to(dev)
            t.guided_rows = torch.tensor([i for i, _ in guided], device=dev)
        # min_tokens: ban the stop ids (not for guided rows: their pattern decides when EOS may come)
        banned = [(i, tok) for i, s in enumerate(seqs)
                  if s.num_output_tokens < s.params.min_tokens and s.guided is None
                  for tok in self._stop_ids(s.params)]
        if banned:
            t.banned_rows = torch.tensor([b[0] for b in banned], device=dev)
            t.banned_tokens = torch.tensor([b[1] for b in banned], device=dev)
        return t

    def _fixed_tensors(self, seqs: list) -> SamplingTensors:
        params = [s.params for s in seqs]
        dev, vocab = self.device, self.vocab_size
        greedy = [p.greedy for p in params]
        return SamplingTensors(
            greedy=torch.tensor(greedy, device=dev),
            temperature=torch.tensor([1.0 if g else p.temperature for g, p in zip(greedy, params)],
                                     dtype=torch.float32, device=dev),
            top_k=torch.tensor([vocab if p.top_k == -1 else min(p.top_k, vocab) for p in params], device=dev),
            top_p=torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev),
            min_p=torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev),
            seeds=[s.seed for s in seqs],
            steps=[],
            all_greedy=all(greedy),
            use_top_k=any(p.top_k != -1 and not g for g, p in zip(greedy, params)),
            use_top_p=any(p.top_p < 1.0 and not g for g, p in zip(greedy, params)),
            use_min_p=any(p.min_p > 0.0 and not g for g, p in zip(greedy, params)),
            num_logprobs=max((p.logprobs for p in params if p.logprobs is not None), default=-1),
        )

    def _stop_ids(self, params) -> list[int]:
        eos = [] if params.ignore_eos else self.eos_token_ids
        return [t for t in eos + params.stop_token_ids if t < self.vocab_size]

    def _add_penalties(self, t: SamplingTensors, seqs: list) -> None:
        def padded(lists):  # ragged id lists -> [S, L], padded with vocab_size (a column nobody reads)
            width = max(1, max(len(x) for x in lists))
            arr = np.full((len(lists), width), self.vocab_size, dtype=np.int64)
            for i, x in enumerate(lists):
                arr[i, :len(x)] = x
            return torch.from_numpy(arr).to(self.device)

        params = [s.params for s in seqs]
        dev = self.device
        t.repetition_penalty = torch.tensor([p.repetition_penalty for p in params], dtype=torch.float32, device=dev)
        t.presence_penalty = torch.tensor([p.presence_penalty for p in params], dtype=torch.float32, device=dev)
        t.frequency_penalty = torch.tensor([p.frequency_penalty for p in params], dtype=torch.float32, device=dev)
        t.prompt_and_output_ids = padded([s.token_ids for s in seqs])
        t.output_ids = padded([s.output_token_ids for s in seqs])

    def __call__(self, logits: torch.Tensor, t: SamplingTensors) -> SamplerOutput:
        logits = logits.float()
        # A row with a NaN or +inf logit (fp16 overflow, a broken request), or none above -inf, gets token
        # -1: the engine ends that request with an error instead of sampling garbage. Read back with the
        # tokens: no extra sync. The row's maximum tells (NaN propagates through it); -inf alone is a
        # token the model rules out, not a fault. Plain greedy rows get that maximum with their token.
        plain = t.repetition_penalty is None and t.frequency_penalty is None and t.banned_rows is None and \
            t.guided_bitmask is None
        if t.all_greedy and plain and t.num_logprobs < 0:
            return SamplerOutput(token_ids=greedy_tokens(logits))
        broken = ~torch.isfinite(logits.amax(dim=-1))
        raw_logprobs = torch.log_softmax(logits, dim=-1) if t.num_logprobs >= 0 else None
        logits = apply_penalties(logits, t)
        if t.banned_rows is not None:
            logits[t.banned_rows, t.banned_tokens] = float("-inf")
        if t.guided_bitmask is not None:
            apply_token_bitmask(logits, t.guided_bitmask, t.guided_rows)
        if t.all_greedy:
            tokens = row_max(logits)[1]
        else:
            uniform = self.seeded_uniform(t, logits.shape[1], logits.device)
            tokens = torch.where(t.greedy, row_max(logits)[1], sample(logits, t, uniform))
        out = SamplerOutput(token_ids=torch.where(broken, -1, tokens))
        if raw_logprobs is not None:
            out.logprobs = raw_logprobs.gather(1, tokens[:, None]).squeeze(1)
            if t.num_logprobs > 0:
                out.top_logprobs, out.top_token_ids = raw_logprobs.topk(t.num_logprobs, dim=-1)
        return out

    def seeded_uniform(self, t: SamplingTensors, vocab_size: int, device: torch.device) -> torch.Tensor:
        """[S, vocab] uniforms in (0, 1): row i from a generator seeded by (seeds[i], steps[i]);
        greedy rows get a constant (they do not sample)."""
        gen = self._generators.get(device)
        if gen is None:
            gen = self._generators[device] = torch.Generator(device=device)
        uniform = torch.empty(len(t.seeds), vocab_size, device=device)
        greedy = t.greedy.tolist() if not t.all_greedy else None
        for i, (seed, step) in enumerate(zip(t.seeds, t.steps)):
            if greedy is not None and greedy[i]:
                uniform[i].fill_(0.5)
                continue
            gen.manual_seed(mix_seed(seed, step))
            torch.rand(vocab_size, generator=gen, device=device, out=uniform[i])
        return uniform.clamp_(1e-7, 1.0 - 1e-7)


def mix_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed from (request seed, output index): splitmix64's finaliser."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """Set logits of disallowed tokens to -inf in the given rows (bit v % 32 of word v // 32 = allowed)."""
    from . import use_triton_ops
    if use_triton_ops(logits):
        from dashinfer_kernels.token_bitmask import apply_token_bitmask as kernel
        kernel(logits, bitmask, rows.to(torch.int32))
        return
    vocab = logits.shape[1]
    shifts = torch.arange(32, device=bitmask.device, dtype=torch.int32)
    allowed = ((bitmask.unsqueeze(-1) >> shifts) & 1).flatten(1)[:, :vocab].bool()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    vocab = logits.shape[1]
    if t.repetition_penalty is not None:
        seen = torch.zeros(logits.shape[0], vocab + 1, dtype=torch.bool, device=logits.device)
        seen.scatter_(1, t.prompt_and_output_ids, True)
        seen = seen[:, :vocab]
        rp = t.repetition_penalty[:, None]
        penalized = torch.where(logits > 0, logits / rp, logits * rp)
        logits = torch.where(seen, penalized, logits)
    if t.frequency_penalty is not None:
        counts = torch.zeros(logits.shape[0], vocab + 1, dtype=logits.dtype, device=logits.device)
        counts.scatter_add_(1, t.output_ids, torch.ones_like(t.output_ids, dtype=logits.dtype))
        counts = counts[:, :vocab]
        logits = logits - t.frequency_penalty[:, None] * counts - t.presence_penalty[:, None] * (counts > 0)
    return logits


def sample(logits: torch.Tensor, t: SamplingTensors, uniform: torch.Tensor) -> torch.Tensor:
    """Draw one token per row from the filtered, tempered distribution (greedy rows: ignored)."""
    logits = logits / t.temperature[:, None]
    if t.use_min_p:
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * t.min_p[:, None]
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    if t.use_top_k or t.use_top_p:
        logits = top_k_top_p(logits, t.top_k, t.top_p)
    probs = torch.softmax(logits, dim=-1)
    # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p.
    return row_max(probs / -torch.log(uniform))[1]


ARGMAX_BLOCK = 128
NUMPY_ARGMAX_ROWS = 16  # up to here numpy's one-thread SIMD argmax of whole rows beats the two-level search


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row of fp32 logits (first index on ties), or -1 where the row's maximum is not finite
    (a NaN wins its row, as in torch.max). On the CPU the small per-row steps run in numpy: each torch op
    costs a parallel-region start (a batch-1 step would spend ~40 us on five of them), and at 64 rows the
    finiteness check alone took ~100 us as torch ops."""
    if logits.device.type == "cpu":
        best, index = _cpu_row_max(logits)
        return torch.from_numpy(np.where(np.isfinite(best), index, -1))
    best, tokens = logits.max(dim=-1)
    return torch.where(torch.isfinite(best), tokens, -1)


def row_max(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, argmax) of each row of a 2-D tensor, the first index on ties, as x.max(-1) gives (a NaN wins its
    row). torch's CPU argmax is scalar code, 8x slower at 64 rows of a 49,152-token vocabulary (12.3 against
    1.5 ms): on the CPU it runs in two levels (see _cpu_row_max)."""
    if x.device.type != "cpu":
        return x.max(dim=-1)
    best, index = _cpu_row_max(x)
    return torch.from_numpy(best).to(x.dtype), torch.from_numpy(index)


def _cpu_row_max(x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(max, argmax) of each row of 2-D CPU logits as fp32 numpy arrays (other dtypes and strided views through
    one fp32 copy). Few rows or a small vocabulary: numpy's argmax of whole rows. Otherwise torch's vectorized
    amax of blocks of 128 on every thread (the one pass over all the logits), then in numpy the first block
    holding the maximum and the index within it only (64 x 49,152: ~430 against ~600 us with those small steps
    as torch ops). A NaN wins its block, then its row, at its first index, as in torch.max."""
    x = x.detach()
    if x.dtype != torch.float32 or x.stride(-1) != 1:
        x = x.float().contiguous()
    a = x.numpy()
    rows, vocab = a.shape
    r = np.arange(rows)
    full = vocab // ARGMAX_BLOCK * ARGMAX_BLOCK
    if rows <= NUMPY_ARGMAX_ROWS or full < 16 * ARGMAX_BLOCK:
        index = a.argmax(axis=1)
        return a[r, index], index
    block_max = x[:, :full].view(rows, full // ARGMAX_BLOCK, ARGMAX_BLOCK).amax(dim=-1).numpy()
    block = block_max.argmax(axis=1)
    # Each row's winning block as one contiguous [rows, 128] gather (not 128 indexed elements per row).
    winners = a[:, :full].reshape(rows, full // ARGMAX_BLOCK, ARGMAX_BLOCK)[r, block]
    index = block * ARGMAX_BLOCK + winners.argmax(axis=1)
    best = block_max[r, block]
    if full < vocab:  # the last partial block
        tail_index = a[:, full:].argmax(axis=1) + full
        tail_best = a[r, tail_index]
        take = (tail_best > best) | (np.isnan(tail_best) & ~np.isnan(best))
        best, index = np.where(take, tail_best, best), np.where(take, tail_index, index)
    return best, index


def top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[1], device=logits.device)[None, :]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k[:, None], float("-inf"))
    sorted_probs = torch.softmax(sorted_logits, dim=-1)
    # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_p[:, None], float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)
