"""Prompt lookup (n-gram) proposals: the tokens that followed the most recent earlier occurrence of the
sequence's last n tokens (n from prompt_lookup_max down to prompt_lookup_min), in its prompt or output.
Free to compute, and right whenever an answer repeats its input (extraction, quoting, code edits)."""
from __future__ import annotations


class NgramIndex:
    """Where each n-gram of a sequence's tokens last ended, kept up to date as tokens are appended
    (each step indexes only the new tokens)."""

    def __init__(self, min_n: int, max_n: int):
        self.sizes = range(max_n, min_n - 1, -1)  # longest first
        self.last_end: dict[tuple[int, ...], int] = {}
        self.num_indexed = 0  # n-grams ending before this position are in last_end

    def propose(self, tokens: list[int], k: int) -> list[int]:
        end = len(tokens)
        # index the n-grams that end before the current suffix (whose continuation is known)
        for e in range(max(self.num_indexed, 1), end):
            for n in self.sizes:
                if n <= e:
                    self.last_end[tuple(tokens[e - n:e])] = e
        self.num_indexed = max(self.num_indexed, end)
        for n in self.sizes:
            if n <= end:
                found = self.last_end.get(tuple(tokens[end - n:end]))
                if found is not None:
                    return tokens[found:found + k]
        return []


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n
        self.indexes: dict[int, NgramIndex] = {}

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        drafts = []
        for seq, k in zip(seqs, ks):
            index = self.indexes.get(seq.seq_id)
            if index is None:
                index = self.indexes[seq.seq_id] = NgramIndex(self.min_n, self.max_n)
            drafts.append(index.propose(seq.token_ids, k))
        return drafts

    def release(self, seq) -> None:
        self.indexes.pop(seq.seq_id, None)
