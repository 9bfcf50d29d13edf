"""LLM: the synchronous offline API (vLLM's shape): generate() and chat() over a batch of prompts."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .errors import InvalidParameterError
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Conversation = list[dict[str, str]]


class LLM:
    """`LLM()` loads the embedded SmolLM2-135M-Instruct; `LLM(path, **engine_options)` an HF directory.
    Engine options are the fields of EngineConfig (dtype, device, max_num_seqs, block_size, ...)."""

    def __init__(self, model: str | None = None, **engine_options):
        config = engine_options.pop("config", None) or EngineConfig.from_kwargs(model=model, **engine_options)
        self.engine = LLMEngine(config)
        self._ids = itertools.count()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> int:
        return self.engine.reset_prefix_cache()

    def score(self, token_ids: list[int], chunk_tokens: int = 512) -> list[float]:
        """Log-probability of each token after the first given the ones before it (teacher forcing),
        computed chunk by chunk through the paged KV cache (quantized, if configured). For
        perplexity: exp(-mean(score(ids)))."""
        import torch

        from .cache.block_manager import BlockOps
        from .engine.scheduler import ScheduledBatch
        from .engine.sequence import Sequence
        engine = self.engine
        if self.engine.has_unfinished_requests():
            raise RuntimeError("score() needs an idle engine")
        request = engine.build_request(f"score-{next(self._ids)}", token_ids[:1], SamplingParams(max_tokens=1))
        seq = Sequence(request=request, index=0, token_ids=list(token_ids), num_prompt_tokens=len(token_ids))
        scores: list[float] = []
        try:
            for start in range(0, len(token_ids) - 1, chunk_tokens):
                n = min(chunk_tokens, len(token_ids) - 1 - start)
                ops = BlockOps()
                if not engine.block_manager.allocate(seq, start + n, ops):
                    raise RuntimeError("score(): the KV cache cannot hold this text")
                logprobs = engine.runner.all_logprobs(ScheduledBatch(seqs=[seq], num_new_tokens=[n], num_decodes=0,
                                                                     ops=ops))
                targets = torch.tensor(token_ids[start + 1:start + n + 1], device=logprobs.device)
                scores += logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
                seq.num_computed_tokens += n
        finally:
            engine.block_manager.free(seq)
        return scores

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 priority: list[int] | None = None, use_tqdm: bool = False) -> list[RequestOutput]:
        """Run every prompt (text, or a list of token ids) to completion; outputs in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        params_list = _per_prompt(sampling_params, len(prompts), "sampling_params")
        priorities = _per_prompt(priority if priority is not None else 0, len(prompts), "priority")
        # Validate every prompt before queueing any, so a bad one leaves nothing behind.
        requests = [self.engine.build_request(f"llm-{next(self._ids)}", p, sp, pr)
                    for p, sp, pr in zip(prompts, params_list, priorities)]
        for request in requests:
            self.engine.add(request)
        return self._run(requests, use_tqdm)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             use_tqdm: bool = False) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        token_lists = [apply_chat_template(self.engine.tokenizer, conv, add_generation_prompt,
                                           **(chat_template_kwargs or {})) for conv in conversations]
        return self.generate(token_lists, sampling_params, use_tqdm=use_tqdm)

    def _run(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = {r.request_id for r in requests}
        progress = None
        if use_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(requests), desc="Generating", unit="req")
        try:
            while len(final) < len(wanted):
                if not self.engine.has_runnable_work():  # only guided compiles pending: wait for one
                    self.engine.guided.wait(self.engine.guided.seconds_to_next_deadline())
                for out in self.engine.step():
                    if out.finished and out.request_id in wanted:
                        final[out.request_id] = out
                        if progress:
                            progress.update(1)
        except BaseException:
            for request in requests:  # leave no half-run request holding KV blocks
                self.engine.abort_request(request.request_id)
            raise
        finally:
            if progress:
                progress.close()
        return [final[r.request_id] for r in requests]


def apply_chat_template(tokenizer, conversation: Conversation, add_generation_prompt: bool = True,
                        **kwargs) -> list[int]:
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidParameterError("messages", "this model's tokenizer has no chat template")
    text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)
    # The template already holds any BOS it wants; adding special tokens again would double it.
    return tokenizer.encode(text, add_special_tokens=False)


def _per_prompt(value, count: int, field: str) -> list:
    if isinstance(value, SequenceABC) and not isinstance(value, (str, bytes)):
        if len(value) != count:
            raise InvalidParameterError(field, f"got {len(value)} values for {count} prompts")
        return list(value)
    return [value] * count
