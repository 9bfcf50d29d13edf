"""The engine's speculative decoding: after a step is scheduled, propose up to k tokens for each sequence
that decodes, check the proposals against a guided sequence's pattern, and give the sampler a view of each
position as if the drafts before it had been appended.

Verification is sampling: the token of every position is drawn as plain decoding would draw it (the same
processed distribution, the same seeded noise for that output index), and a draft is accepted when it equals
the drawn token; the first mismatch, or the position after the last draft, yields the drawn token itself.
For a proposer that puts all its mass on one token x (n-gram lookup; a draft model decoding greedily) this is
the standard rejection-sampling rule: x is accepted with probability p(x), and otherwise the token comes from
p with x removed, renormalised. So the output distribution is unchanged, greedy output is the same token for
token, and a seeded request gives the same text with and without speculation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .config import SpeculativeConfig


@dataclass(eq=False)
class DraftView:
    """What the sampler reads of `seq` at draft position `position`: the sequence as if drafts[:position]
    had been appended (sampling index, penalties' token counts, the guided mask of that position)."""
    seq: object
    position: int
    drafts: list[int]
    guided: object = None  # a MaskRow for a guided sequence

    @property
    def seq_id(self):
        return (self.seq.seq_id, self.position)

    @property
    def params(self):
        return self.seq.params

    @property
    def seed(self) -> int:
        return self.seq.seed

    @property
    def num_output_tokens(self) -> int:
        return self.seq.num_output_tokens + self.position

    @property
    def token_ids(self) -> list[int]:
        return self.seq.token_ids + self.drafts[:self.position]

    @property
    def output_token_ids(self) -> list[int]:
        return self.seq.output_token_ids + self.drafts[:self.position]


@dataclass
class MaskRow:
    """A guided sequence's allowed-token bitmask at one draft position, written when the drafts were checked."""
    mask: torch.Tensor

    def write_mask(self, row: torch.Tensor) -> None:
        row.copy_(self.mask)


@dataclass
class SpeculativeStats:
    num_steps: int = 0  # steps in which some sequence verified drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass
class Speculator:
    config: SpeculativeConfig
    proposer: object  # NgramProposer or DraftProposer: propose(seqs, ks) -> drafts, release(seq)
    vocab_size: int
    eos_token_id: int | None
    max_model_len: int
    stats: SpeculativeStats = field(default_factory=SpeculativeStats)
    masks: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> [k + 1, words] for guided rows

    def propose(self, batch) -> dict[int, list[int]]:
        """Drafts for the batch entries that decode one token: {batch index: tokens} (empty when the step
        has more decoding sequences than disable_by_batch_size)."""
        self.masks.clear()
        entries = [(i, seq) for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens))
                   if n == 1 and seq.num_uncomputed_tokens == 1 and seq.request.pooling is None]
        limit = self.config.disable_by_batch_size
        if not entries or (limit is not None and len(entries) > limit):
            return {}
        k = self.config.num_speculative_tokens
        chosen, ks = [], []
        for i, seq in entries:
            room = min(k, seq.params.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens - 1)
            if room > 0:
                chosen.append((i, seq))
                ks.append(room)
        if not chosen:
            return {}
        proposals = self.proposer.propose([seq for _, seq in chosen], ks)
        drafts = {}
        for (i, seq), tokens in zip(chosen, proposals):
            if tokens and seq.guided is not None:
                tokens = self._check_guided(seq, tokens)
            if tokens:
                drafts[i] = tokens
        return drafts

    def _check_guided(self, seq, drafts: list[int]) -> list[int]:
        """Keep the drafts the pattern allows (up to the first it does not, and before EOS), and write the
        mask of every position for the sampler; the FSM is rolled back to where it was."""
        state = seq.guided
        masks = torch.zeros(len(drafts) + 1, -(-self.vocab_size // 32), dtype=torch.int32)
        kept = []
        for j, token in enumerate(drafts):
            state.write_mask(masks[j])
            if token == self.eos_token_id or not (int(masks[j, token >> 5]) >> (token & 31)) & 1:
                break
            state.advance(token)
            kept.append(token)
        state.write_mask(masks[len(kept)])
        if kept:
            state.guide.rollback_state(len(kept))
        self.masks[seq.seq_id] = masks
        return kept

    def views(self, seq, drafts: list[int]) -> list[DraftView]:
        """The sampler's rows for seq's k drafts: positions 0..k (the last one follows every draft)."""
        masks = self.masks.get(seq.seq_id)
        return [DraftView(seq, j, drafts, MaskRow(masks[j]) if masks is not None else None)
                for j in range(len(drafts) + 1)]

    def count(self, seq, num_drafts: int, num_accepted: int) -> None:
        seq.num_draft_tokens += num_drafts
        seq.num_accepted_tokens += num_accepted
        self.stats.num_draft_tokens += num_drafts
        self.stats.num_accepted_tokens += num_accepted

    def release(self, seq) -> None:
        self.proposer.release(seq)


def make_speculator(config: SpeculativeConfig, engine) -> Speculator:
    if config.method == "ngram":
        from .ngram import NgramProposer
        proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
    else:
        from .draft import DraftProposer
        proposer = DraftProposer(config, engine.config, engine.runner, engine.tokenizer)
    eos = engine.eos_token_ids[0] if engine.eos_token_ids else None
    return Speculator(config, proposer, engine.vocab_size, eos, engine.max_model_len)
