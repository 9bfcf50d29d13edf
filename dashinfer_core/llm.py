"""LLM: the synchronous offline API (vLLM's shape): generate() and chat() over a batch of prompts."""
from __future__ import annotations

import itertools
from collections.abc import Sequence as SequenceABC

from .config import EngineConfig
from .engine.llm_engine import LLMEngine
from .errors import InvalidParameterError
from .lora.request import LoRARequest
from .outputs import RequestOutput
from .sampling_params import SamplingParams

Conversation = list[dict[str, str]]


class LLM:
    """`LLM()` loads the embedded SmolLM2-135M-Instruct; `LLM(path, **engine_options)` an HF directory.
    Engine options are the fields of EngineConfig (dtype, device, max_num_seqs, block_size, ...)."""

    def __init__(self, model: str | None = None, **engine_options):
        config = engine_options.pop("config", None) or EngineConfig.from_kwargs(model=model, **engine_options)
        self.engine = LLMEngine(config, offline=True)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the engine's helper threads and tensor-parallel ranks (also done at interpreter exit)."""
        self.engine.shutdown()

    def get_tokenizer(self):
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> int:
        return self.engine.reset_prefix_cache()

    def score(self, token_ids: list[int], chunk_tokens: int = 512) -> list[float]:
        """Log-probability of each token after the first given the ones before it (teacher forcing),
        through the paged KV cache (quantized, if configured). For perplexity: exp(-mean(score(ids)))."""
        return self.engine.score(token_ids, chunk_tokens)

    # ---- LoRA adapters (enable_lora=True) ---------------------------------------------------------
    def add_lora(self, lora_request: LoRARequest) -> bool:
        """Load a PEFT adapter directory now; a bad one raises InvalidParameterError naming the field."""
        return self.engine.add_lora(lora_request)

    def remove_lora(self, lora_int_id: int) -> bool:
        return self.engine.remove_lora(lora_int_id)

    def list_loras(self) -> set[int]:
        return self.engine.list_loras()

    def generate(self, prompts: str | list[str] | list[list[int]] | dict | list[dict],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 priority: list[int] | None = None, use_tqdm: bool = False,
                 lora_request: LoRARequest | list[LoRARequest | None] | None = None) -> list[RequestOutput]:
        """Run every prompt (text, or a list of token ids) to completion; outputs in prompt order.
        A prompt may also be vLLM's dict: {"prompt": text or "prompt_token_ids": ids, "multi_modal_data":
        {"image": an image or a list}} (vision-language models; images as PIL images, paths or data: URLs).
        lora_request: one adapter for every prompt, or one (or None: the base model) per prompt."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts, images = zip(*(_split_prompt(p, i) for i, p in enumerate(prompts))) if prompts else ((), ())
        params_list = _per_prompt(sampling_params, len(prompts), "sampling_params")
        priorities = _per_prompt(priority if priority is not None else 0, len(prompts), "priority")
        loras = _per_prompt(lora_request, len(prompts), "lora_request")
        # Validate every prompt (and read every adapter) before queueing any, so a bad one leaves
        # nothing behind.
        requests = [self.engine.build_request(f"llm-{next(self._ids)}", p, sp, pr, lora_request=lr, images=im)
                    for p, sp, pr, lr, im in zip(prompts, params_list, priorities, loras, images)]
        for lora in {lr.lora_int_id: lr for lr in loras if lr is not None}.values():
            self.engine.add_lora(lora)
        for request in requests:
            self.engine.add(request)
        return self._run(requests, use_tqdm)

    def chat(self, messages: Conversation | list[Conversation],
             sampling_params: SamplingParams | list[SamplingParams] | None = None,
             add_generation_prompt: bool = True, chat_template_kwargs: dict | None = None,
             use_tqdm: bool = False, lora_request: LoRARequest | list[LoRARequest | None] | None = None,
             tools: list[dict] | None = None, tool_choice: str | dict | None = None,
             parallel_tool_calls: bool | None = None) -> list[RequestOutput]:
        """Render each conversation with the tokenizer's chat template, then generate. Message content
        may be OpenAI's parts: {"type": "text", "text": ...}, {"type": "image_url", "image_url": {"url":
        "data:image/png;base64,..."}} or {"type": "image", "image": a PIL image or a path}.
        tools / tool_choice / parallel_tool_calls: OpenAI's (see dashinfer_core.tools); each output's
        `tool_calls` holds the parsed calls. A reasoning model's thinking comes apart as
        `reasoning_content` (enable_thinking goes in chat_template_kwargs)."""
        from .chat import parse_chat_output, plan_chat
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        params_list = _per_prompt(sampling_params or SamplingParams(), len(conversations), "sampling_params")
        prompts, plans = [], []
        for conv, params in zip(conversations, params_list):
            with self.engine.tokenizer_lock:
                plan = plan_chat(self.engine.tokenizer, conv, params, tools, tool_choice, parallel_tool_calls,
                                 chat_template_kwargs, add_generation_prompt)
            plans.append(plan)
            images = conversation_images(conv)
            prompts.append({"prompt_token_ids": plan.prompt_ids, "multi_modal_data": {"image": images}}
                           if images else plan.prompt_ids)
        outputs = self.generate(prompts, [p.params for p in plans], use_tqdm=use_tqdm, lora_request=lora_request)
        for out, plan in zip(outputs, plans):
            if plan.tools is None and not plan.reasoning:
                continue
            for completion in out.outputs:
                message = parse_chat_output(plan, completion.text)
                completion.reasoning_content = message.reasoning_content
                if plan.tools is not None:
                    completion.tool_calls = message.tool_calls
        return outputs

    def embed(self, prompts: str | list[str] | list[list[int]], pooling: str = "last", normalize: bool = True,
              use_tqdm: bool = False) -> list[list[float]]:
        """One embedding per prompt: the final hidden states (after the model's last norm) of its last
        token (pooling="last") or their mean ("mean"), L2-normalised unless normalize=False."""
        from .pooling import PoolingParams
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        pooling_params = PoolingParams(pooling, normalize)
        requests = [self.engine.build_request(f"llm-{next(self._ids)}", p, SamplingParams(max_tokens=1),
                                              pooling=pooling_params) for p in prompts]
        for request in requests:
            self.engine.add(request)
        return [out.embedding for out in self._run(requests, use_tqdm)]

    def _run(self, requests, use_tqdm: bool) -> list[RequestOutput]:
        final: dict[str, RequestOutput] = {}
        wanted = {r.request_id for r in requests}
        progress = None
        if use_tqdm:
            from tqdm import tqdm
            progress = tqdm(total=len(requests), desc="Generating", unit="req")
        try:
            while len(final) < len(wanted):
                self.engine.wait_for_work()  # returns at once unless only guided compiles are pending
                for out in self.engine.step(final_only=True):
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


def conversation_images(conversation: Conversation) -> list:
    """The images of a conversation's content parts, in order (what the chat template renders as
    image placeholders); a part of another kind is an error naming it."""
    images = []
    for i, message in enumerate(conversation):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image_url":
                url = part.get("image_url")
                images.append(url.get("url") if isinstance(url, dict) else url)
            elif kind == "image":
                images.append(part.get("image"))
            elif kind != "text":
                raise InvalidParameterError(f"messages[{i}].content[{j}].type",
                                            f"must be 'text', 'image_url' or 'image', got {kind!r}")
    return images


def _split_prompt(prompt, index: int):
    """(text or token ids, images or None) of one prompt, vLLM's dict form included."""
    if not isinstance(prompt, dict):
        return prompt, None
    unknown = set(prompt) - {"prompt", "prompt_token_ids", "multi_modal_data"}
    if unknown:
        raise InvalidParameterError(f"prompts[{index}].{sorted(unknown)[0]}", "not a field of a prompt")
    text = prompt.get("prompt_token_ids", prompt.get("prompt"))
    data = prompt.get("multi_modal_data") or {}
    if set(data) - {"image"}:
        raise InvalidParameterError(f"prompts[{index}].multi_modal_data.{sorted(set(data) - {'image'})[0]}",
                                    "only images are supported")
    images = data.get("image")
    if images is not None and not isinstance(images, (list, tuple)):
        images = [images]
    return text, images


def _per_prompt(value, count: int, field: str) -> list:
    if isinstance(value, SequenceABC) and not isinstance(value, (str, bytes)):
        if len(value) != count:
            raise InvalidParameterError(field, f"got {len(value)} values for {count} prompts")
        return list(value)
    return [value] * count
