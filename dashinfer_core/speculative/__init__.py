"""Speculative decoding: n-gram prompt lookup or a draft model proposes, the target verifies in one forward."""
from .config import SpeculativeConfig

__all__ = ["SpeculativeConfig"]
