"""Per-sequence guided-decoding state: the outlines-core Guide, the allowed-token bitmask, and
jump-forward over tokens the pattern forces."""
from __future__ import annotations

import torch

# Jump-forward looks at small allowed sets only; a large set is never a forced string.
MAX_FORCED_CANDIDATES = 16
MAX_FORCED_PER_STEP = 64


class SmallAllowedSets:
    """Per compiled index: the allowed tokens of each FSM state if there are at most
    MAX_FORCED_CANDIDATES of them, else None. Listing a state's allowed tokens can mean building a
    list of the whole vocabulary, so each state is listed once and shared by every sequence."""

    def __init__(self, index):
        self.index = index
        self.by_state: dict[int, tuple[int, ...] | None] = {}

    def get(self, guide) -> tuple[int, ...] | None:
        state = guide.get_state()
        if state not in self.by_state:
            allowed = guide.get_tokens()
            self.by_state[state] = tuple(allowed) if len(allowed) <= MAX_FORCED_CANDIDATES else None
        return self.by_state[state]


class GuidedState:
    def __init__(self, small_sets: SmallAllowedSets, eos_token_id: int, token_bytes: dict[int, bytes]):
        from outlines_core import Guide
        self.guide = Guide(small_sets.index)
        self.small_sets = small_sets
        self.eos_token_id = eos_token_id
        self.token_bytes = token_bytes

    def write_mask(self, row: torch.Tensor) -> None:
        """Write the allowed-token bitmask into `row` (a contiguous int32 CPU tensor)."""
        self.guide.write_mask_into(row.data_ptr(), row.numel(), 4)

    def advance(self, token_id: int) -> None:
        self.guide.advance(token_id, return_tokens=False)

    def only_eos_allowed(self) -> bool:
        return self.small_sets.get(self.guide) == (self.eos_token_id,)

    def forced_tokens(self) -> list[int]:
        """Tokens the pattern leaves no choice about, taken greedily (longest first) and advanced:
        while every allowed token spells a prefix of the longest one (say `{"` and `{` after the
        start of a JSON object), the text is forced, and the longest token covers most of it."""
        forced = []
        while len(forced) < MAX_FORCED_PER_STEP:
            allowed = self.small_sets.get(self.guide)
            if not allowed or self.eos_token_id in allowed:
                break
            spelled = [(self.token_bytes.get(t, b""), t) for t in allowed]
            longest, token = max(spelled, key=lambda s: len(s[0]))
            if not longest or not all(longest.startswith(s) for s, _ in spelled):
                break
            self.guide.advance(token, return_tokens=False)
            forced.append(token)
        return forced
