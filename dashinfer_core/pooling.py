"""Embeddings from the generation engine: a pooling request runs its prompt through the same batches as
generation (chunked prefill, the paged cache) and, instead of sampling, pools the final hidden states
(after the model's last norm): the last token's, or the mean over every prompt token; L2-normalised
unless asked not to. Mean pooling needs every token's hidden state, so its prompt does not start from
the prefix cache (its blocks are still offered to later requests)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidParameterError

POOLING_MODES = ("last", "mean")


@dataclass(frozen=True)
class PoolingParams:
    pooling: str = "last"
    normalize: bool = True

    def __post_init__(self):
        if self.pooling not in POOLING_MODES:
            raise InvalidParameterError("pooling", f"must be one of {POOLING_MODES}, got {self.pooling!r}")
        if not isinstance(self.normalize, bool):
            raise InvalidParameterError("normalize", f"must be true or false, got {self.normalize!r}")


def to_base64(vector: list[float]) -> str:
    """OpenAI's base64 encoding of an embedding: little-endian float32 bytes."""
    import base64
    import struct
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def accumulate(seq, hidden: torch.Tensor, start: int, final: bool) -> list[float] | None:
    """Add one chunk's hidden states ([n, hidden], the chunk starting at token `start`) to the sequence's
    pool; the embedding once the chunk is the prompt's last."""
    params: PoolingParams = seq.request.pooling
    if params.pooling == "mean":
        chunk_sum = hidden.float().sum(dim=0)
        seq.pool_sum = chunk_sum if start == 0 or seq.pool_sum is None else seq.pool_sum + chunk_sum
    if not final:
        return None
    vector = hidden[-1].float() if params.pooling == "last" else seq.pool_sum / seq.num_prompt_tokens
    if params.normalize:
        vector = torch.nn.functional.normalize(vector, dim=0)
    seq.pool_sum = None
    return vector.cpu().tolist()
