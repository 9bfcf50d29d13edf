"""Draft-model proposals: a smaller (or quantized) model sharing the target's tokenizer decodes k tokens
greedily for each speculating sequence, batched across sequences, k forwards per step.

The draft keeps its own paged KV cache. Each sequence has a mirror (a Sequence over the same token list)
whose blocks hold the draft's K/V: after a step, what the draft computed for its own drafts stays valid
as far as the target accepted them, so the next proposal feeds only the tokens the draft has not seen.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from ..cache.block_manager import BlockManager, BlockOps
from ..cache.kv_cache import bytes_per_block
from ..errors import InvalidParameterError
from ..layers.sampler import row_max


@dataclass
class Mirror:
    seq: object  # engine Sequence: the target's token list, the draft's block table and computed count
    confirmed: int = 0  # target tokens when the draft last proposed ...
    fed: list[int] = dataclasses.field(default_factory=list)  # ... and the drafts it computed after them


class DraftProposer:
    def __init__(self, spec, target_config, target_runner, target_tokenizer):
        from ..engine.runner import ModelRunner, resolve_dtype
        from ..loader import resolve_model_dir
        from ..models import load_model_config
        config = dataclasses.replace(
            target_config, model=spec.model, quantization=spec.quantization, dtype=spec.dtype, group_size=None,
            kv_cache_dtype="auto", tokenizer=None, tensor_parallel_size=1, distributed_init_method=None,
            cpu_threads_bind=None, enable_lora=False, enable_prefix_caching=False, cpu_cache_memory=0,
            speculative=None, disk_cache_dir=None, max_model_len=target_runner.max_model_len, kv_cache_memory=1)
        model_dir = resolve_model_dir(config.model)
        model_cfg = load_model_config(model_dir)
        if model_cfg.vocab_size != target_runner.vocab_size:
            raise InvalidParameterError("speculative.model", f"the draft's vocabulary has {model_cfg.vocab_size} "
                                        f"tokens, the target's {target_runner.vocab_size}: they must be the same")
        if target_tokenizer is not None:
            check_same_tokenizer(model_dir, target_tokenizer)
        # as many tokens of KV as the target's cache holds
        dtype = resolve_dtype(config.dtype, target_runner.device, config.quantization)
        per_block = bytes_per_block(model_cfg.num_layers, config.block_size, model_cfg.num_kv_heads,
                                    model_cfg.head_dim, dtype)
        config = dataclasses.replace(config, kv_cache_memory=target_runner.kv_cache.num_blocks * per_block)
        self.runner = ModelRunner(config)
        self.blocks = BlockManager(self.runner.kv_cache.num_blocks, config.block_size)
        self.mirrors: dict[int, Mirror] = {}

    def propose(self, seqs: list, ks: list[int]) -> list[list[int]]:
        from ..engine.runner import padded_count
        from ..engine.scheduler import ScheduledBatch
        from ..engine.sequence import Sequence
        ops = BlockOps()
        active = []  # (index in seqs, mirror sequence, drafts wanted)
        for index, (seq, k) in enumerate(zip(seqs, ks)):
            mirror = self.mirrors.get(seq.seq_id)
            if mirror is None:
                mirror = self.mirrors[seq.seq_id] = Mirror(Sequence(
                    request=seq.request, index=seq.index, token_ids=seq.token_ids, num_prompt_tokens=seq.num_prompt_tokens))
            m = mirror.seq
            # the draft's K/V past the confirmed tokens is for its drafts: valid as far as the target took them
            valid = mirror.confirmed + _common_prefix(mirror.fed, seq.token_ids[mirror.confirmed:])
            m.num_computed_tokens = min(m.num_computed_tokens, valid)
            m.spec_tokens = []
            k = min(k, self.runner.max_model_len - seq.num_tokens)
            if k <= 0:
                continue
            if not self.blocks.allocate(m, seq.num_tokens + k - 1, ops):
                self.release(seq)  # its cache is full: this sequence starts over next time
                continue
            active.append((index, m, k))
        drafts: list[list[int]] = [[] for _ in seqs]
        while active:
            # decodes first, as the attention metadata wants; the first round feeds every unseen token
            active.sort(key=lambda a: a[1].num_tokens + len(a[1].spec_tokens) - a[1].num_computed_tokens != 1)
            num_new = [m.num_tokens + len(m.spec_tokens) - m.num_computed_tokens for _, m, _ in active]
            batch = ScheduledBatch(seqs=[m for _, m, _ in active], num_new_tokens=num_new,
                                   num_decodes=sum(1 for n in num_new if n == 1), ops=ops)
            ops = BlockOps()
            logit_rows = (np.cumsum(num_new) - 1).tolist()
            if self.runner.bucket_shapes:
                logit_rows += logit_rows[-1:] * (padded_count(len(logit_rows)) - len(logit_rows))
            logits = self.runner.run_plan(self.runner._plan(batch, logit_rows))
            self.runner.last_hidden = None
            tokens = row_max(logits[:len(active)].float())[1].tolist()
            still = []
            for (index, m, k), n, token in zip(active, num_new, tokens):
                m.num_computed_tokens += n
                drafts[index].append(token)
                if len(drafts[index]) < k:
                    m.spec_tokens.append(token)
                    still.append((index, m, k))
            active = still
        for seq, tokens in zip(seqs, drafts):
            mirror = self.mirrors.get(seq.seq_id)
            if mirror is not None and tokens:
                mirror.confirmed, mirror.fed = seq.num_tokens, tokens[:-1]
                mirror.seq.spec_tokens = []
        return drafts

    def release(self, seq) -> None:
        mirror = self.mirrors.pop(seq.seq_id, None)
        if mirror is not None:
            self.blocks.free(mirror.seq)

    @property
    def num_free_blocks(self) -> int:
        return self.blocks.num_free_blocks


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def check_same_tokenizer(model_dir, target_tokenizer) -> None:
    from ..engine.llm_engine import load_tokenizer
    try:
        tokenizer = load_tokenizer(model_dir)
    except Exception as exc:
        raise InvalidParameterError("speculative.model", f"the draft's tokenizer could not be loaded from "
                                    f"{model_dir}: {exc}") from exc
    if tokenizer.get_vocab() != target_tokenizer.get_vocab():
        raise InvalidParameterError("speculative.model", "the draft's tokenizer differs from the target's: "
                                    "a draft must share the target's vocabulary")
