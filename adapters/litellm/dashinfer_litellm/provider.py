"""The LiteLLM CustomLLM provider.

One AsyncEngine per (model, engine options), created on first use and shared by every request, so
concurrent requests are batched continuously. Engine options come from the model entry's
litellm_params (any EngineConfig field: dtype, device, max_num_seqs, block_size, kv_cache_memory,
enable_prefix_caching, ...); everything else is a sampling parameter, `extra_body` included (guided
decoding under our names json_schema / regex / choice, vLLM's guided_json / guided_regex /
guided_choice / structured_outputs, or response_format). A model entry with `lora: {name: sql, path:
/adapters/sql}` serves that PEFT adapter on its base model's engine: every entry of one base model
with the same engine options (LoRA turned on: `enable_lora: true` on the base entry) shares one
engine, and the adapters' rows batch together. A parameter the provider cannot honour
(tools, logit_bias, an unknown name, a message part that is not text, ...) is a 400 naming it, never
dropped. Errors become LiteLLM exceptions with the right HTTP status (400 bad parameter, 400 context
window, 500 engine failure); for streams they are raised before the first chunk, so the proxy can
still answer with that status.
"""
from __future__ import annotations

import asyncio
import json
import os
import threading
import time
import uuid
from dataclasses import asdict, fields

import litellm
from litellm import CustomLLM
from litellm.types.utils import Delta, GenericStreamingChunk, ModelResponse, ModelResponseStream, StreamingChoices

from dashinfer_core import (AsyncEngine, EngineConfig, EngineDeadError, InvalidParameterError, LoRARequest,
                            PromptTooLongError, RequestFailedError, SamplingParams)
from dashinfer_core.llm import conversation_images

PROVIDER = "dashinfer"
# EngineConfig fields a model entry may set. `seed` is left out: in a request it is the sampling seed.
ENGINE_FIELDS = {f.name for f in fields(EngineConfig)} - {"model", "seed", "skip_tokenizer_init"}
# OpenAI / LiteLLM parameters accepted without bearing on what is generated: transport and
# bookkeeping (LiteLLM itself honours stream_options.include_usage from the usage we report).
PASSIVE_PARAMS = {"stream", "user", "metadata", "max_retries", "timeout", "api_base", "api_key", "extra_headers"}
# Guided decoding: our names, vLLM's names, and the keys of vLLM's structured_outputs.
GUIDED_NAMES = {"json_schema": "json_schema", "guided_json": "json_schema", "regex": "regex",
                "guided_regex": "regex", "choice": "choice", "guided_choice": "choice"}
STRUCTURED_OUTPUT_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "json_object": "json_object"}
NO_FUNCTIONS = "the deprecated functions / function_call are not supported; use tools / tool_choice"
TOOL_PARAMS = ("tools", "tool_choice", "parallel_tool_calls")


def _harmless(name: str, value) -> bool:
    """Parameters the provider does not act on whose value asks for nothing beyond its behaviour."""
    if name == "functions":
        return value == []
    if name == "function_call":
        return value == "none"
    if name == "stream_options":
        return isinstance(value, dict) and set(value) <= {"include_usage"}
    if name == "logit_bias":
        return value == {}
    if name == "store":
        return value is False
    if name == "service_tier":
        return value in ("auto", "default")
    if name == "modalities":
        return value == ["text"]
    return False


def _refusal(name: str) -> str:
    if name in ("functions", "function_call"):
        return NO_FUNCTIONS
    if name == "logit_bias":
        return "not supported by the engine yet"
    if name == "store":
        return "completions are not stored by this provider"
    if name in ("modalities", "audio"):
        return "text output only"
    if name in ("guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern"):
        return "not supported; guided decoding takes json_schema, regex or choice (or vLLM's guided_json, " \
               "guided_regex, guided_choice)"
    return "not a parameter this provider understands"


_engines: dict[tuple, AsyncEngine] = {}
_engines_lock = threading.Lock()
# engine key -> adapter name -> its LoRARequest (ids given in order of first use, from 1)
_loras: dict[tuple, dict[str, LoRARequest]] = {}


def _engine_key(model: str, options: dict) -> tuple:
    return model, tuple(sorted((k, repr(v)) for k, v in options.items()))


_metrics = None  # dashinfer_core.metrics.Metrics of this process's engines, made with the first one


def metrics():
    """The Prometheus metrics of every engine this process runs (labelled by model_name as in engine_stats)."""
    global _metrics
    if _metrics is None:
        from dashinfer_core.metrics import Metrics
        _metrics = Metrics()
    return _metrics


def _model_label(key: tuple) -> str:
    return f"{key[0]}{list(key[1]) or ''}"


def engine_for(model: str, options: dict) -> AsyncEngine:
    key = _engine_key(model, options)
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None or not engine.is_running:
            config = EngineConfig(model=None if model in ("", "default") else model, **options)
            engine = _engines[key] = AsyncEngine(config)
            _loras[key] = {}
            metrics().attach(engine, _model_label(key))
        return engine


def lora_for(model: str, options: dict, spec, where: str = "lora") -> LoRARequest:
    """The LoRARequest of a model entry's `lora: {name, path}` on the engine of (model, options)."""
    if not isinstance(spec, dict) or set(spec) != {"name", "path"} or not all(
            isinstance(spec[k], str) and spec[k] for k in ("name", "path")):
        raise _bad_request(f"{where}: must be an object {{name: ..., path: <PEFT adapter directory>}}, got {spec!r}",
                           model)
    with _engines_lock:
        named = _loras.setdefault(_engine_key(model, options), {})
        lora = named.get(spec["name"])
        if lora is None:
            lora = named[spec["name"]] = LoRARequest(spec["name"], len(named) + 1, spec["path"])
        elif lora.lora_path != spec["path"]:
            raise _bad_request(f"{where}: adapter {spec['name']!r} is already served from {lora.lora_path}", model)
        return lora


def engine_stats() -> dict:
    """Stats of every engine this process runs, keyed by model."""
    return {_model_label(key): asdict(engine.get_stats()) for key, engine in list(_engines.items())}


def _bad_request(message: str, model: str):
    return litellm.BadRequestError(message=message, model=model, llm_provider=PROVIDER)


def split_params(optional_params: dict, model: str) -> tuple[dict, dict]:
    """(engine options, sampling parameters) from LiteLLM's optional_params, `extra_body` merged in.
    A parameter the provider cannot honour raises a 400 naming it: nothing is dropped."""
    params = dict(optional_params)
    extra_body = params.pop("extra_body", None) or {}
    if not isinstance(extra_body, dict):
        raise _bad_request("extra_body: must be an object", model)
    for key, value in extra_body.items():
        if key in params and params[key] is not None and params[key] != value:
            raise _bad_request(f"{key}: given both as a parameter and in extra_body", model)
        params[key] = value
    engine_opts, sampling = {}, {}
    for key, value in params.items():
        if key in ENGINE_FIELDS:
            engine_opts[key] = value
        elif value is not None and key not in PASSIVE_PARAMS and not _harmless(key, value):
            sampling[key] = value  # what SamplingParams cannot take is refused there
    return engine_opts, sampling


def guided_params(params: dict, model: str) -> dict:
    """Pop the guided-decoding request (our names, vLLM's, structured_outputs, response_format) from
    params: SamplingParams keywords, `response_format` left for SamplingParams.from_response_format.
    At most one per request."""
    found: dict[str, tuple[str, object]] = {}  # canonical -> (name in the request, value)

    def add(canonical, named, value):
        if found:
            raise _bad_request(f"{named}: at most one guided-decoding field per request (already given: "
                               f"{next(iter(found.values()))[0]})", model)
        found[canonical] = (named, value)

    response_format = params.pop("response_format", None)
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise _bad_request("response_format: must be an object with a 'type'", model)
        if response_format.get("type") not in (None, "text"):
            add("response_format", "response_format", response_format)
    for name, canonical in GUIDED_NAMES.items():
        value = params.pop(name, None)
        if value is not None:
            add(canonical, name, value)
    structured = params.pop("structured_outputs", None)
    if structured is not None:
        if not isinstance(structured, dict):
            raise _bad_request("structured_outputs: must be an object", model)
        for key, value in structured.items():
            if value is None or value is False:
                continue
            if key not in STRUCTURED_OUTPUT_KEYS:
                raise _bad_request(f"structured_outputs.{key}: not supported; use json, regex, choice or "
                                   f"json_object", model)
            add(STRUCTURED_OUTPUT_KEYS[key], f"structured_outputs.{key}", value)
    return {canonical: value for canonical, (_, value) in found.items()}


def sampling_params(params: dict, model: str) -> SamplingParams:
    params = dict(params)
    kwargs = {}
    for ours, theirs in (("max_tokens", "max_tokens"), ("max_tokens", "max_completion_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("min_p", "min_p"), ("presence_penalty", "presence_penalty"),
                         ("frequency_penalty", "frequency_penalty"), ("repetition_penalty", "repetition_penalty"),
                         ("seed", "seed"), ("n", "n"), ("stop", "stop"), ("min_tokens", "min_tokens"),
                         ("ignore_eos", "ignore_eos")):
        if theirs in params:
            kwargs[ours] = params.pop(theirs)
    kwargs.update(guided_params(params, model))
    kwargs.setdefault("max_tokens", 256)
    logprobs = params.pop("logprobs", None)
    top_logprobs = params.pop("top_logprobs", None)
    if isinstance(logprobs, bool):  # chat: logprobs=True plus top_logprobs=N
        if logprobs:
            kwargs["logprobs"] = int(top_logprobs or 0)
    elif logprobs is not None:  # text completions: logprobs=N is the count
        kwargs["logprobs"] = logprobs
    if params:
        first, *rest = sorted(params)
        raise _bad_request(f"{first}: {_refusal(first)}" + (f" (nor is: {rest})" if rest else ""), model)
    response_format = kwargs.pop("response_format", None)
    try:
        return SamplingParams.from_response_format(response_format, **kwargs)
    except InvalidParameterError as exc:
        raise _bad_request(str(exc), model) from None
    except TypeError as exc:
        raise _bad_request(str(exc), model) from None


def message_text(content, model: str = "", where: str = "messages[0].content") -> str:
    if isinstance(content, list):  # OpenAI content parts: text only, joined by newlines (as vLLM, FastChat)
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise _bad_request(f"{where}[{j}]: only text parts are supported (text-only models), got type "
                                   f"{kind!r}", model)
        return "\n".join(part.get("text", "") for part in content)
    if content is not None and not isinstance(content, str):
        raise _bad_request(f"{where}: must be a string or a list of text parts", model)
    return content or ""


def image_parts(content, model: str, where: str) -> list | None:
    """A message's content parts as the chat template takes them when they carry images (text and
    image_url parts, in order; vision-language models), None when they are text only."""
    if not isinstance(content, list) or not any(isinstance(p, dict) and p.get("type") == "image_url"
                                                for p in content):
        return None
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": part.get("text", "")})
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise _bad_request(f"{where}[{j}]: image_url must be {{\"url\": \"data:...\"}}", model)
            parts.append({"type": "image_url", "image_url": {"url": url}})
        else:
            raise _bad_request(f"{where}[{j}]: only text and image_url parts are supported, got type {kind!r}", model)
    return parts


def conversation(messages: list, model: str) -> list[dict]:
    """Chat messages as the chat template takes them (tool calls and tool results included); what it
    would lose is refused with the field named. `developer` is OpenAI's newer name for `system`. Image
    parts stay as parts (the engine refuses them for a text-only model)."""
    if not isinstance(messages, list) or not messages:
        raise _bad_request("messages: must be a non-empty list of messages", model)
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise _bad_request(f"messages[{i}]: must be an object with a role and content", model)
        role = message.get("role")
        if role not in ("system", "user", "assistant", "developer", "tool"):
            raise _bad_request(f"messages[{i}].role: must be one of system, user, assistant, developer, tool, got "
                               f"{role!r}" + (f" ({NO_FUNCTIONS})" if role == "function" else ""), model)
        extra = {}
        for key, value in message.items():
            if key in ("role", "content") or value is None:
                continue
            if key == "tool_calls" and role == "assistant" or key in ("tool_call_id", "name") and role == "tool":
                extra[key] = value
                continue
            raise _bad_request(f"messages[{i}].{key}: " + (NO_FUNCTIONS if key == "function_call"
                                                          else "not supported (only role and content are used)"),
                               model)
        where = f"messages[{i}].content"
        parts = image_parts(message.get("content"), model, where)
        out.append({"role": "system" if role == "developer" else role, **extra,
                    "content": parts if parts is not None else message_text(message.get("content"), model, where)})
    return out


class _Call:
    """One request: validated and tokenized up front, so errors surface before any output."""

    def __init__(self, model: str, messages: list, optional_params: dict, litellm_params: dict | None):
        self.model = model
        params = dict(optional_params or {})
        lora_spec = params.pop("lora", None)
        engine_opts, sampling = split_params(params, model)
        if lora_spec is not None:
            if engine_opts.get("enable_lora") is False:
                raise _bad_request("lora: the entry sets enable_lora: false", model)
            engine_opts["enable_lora"] = True
        try:
            self.engine = engine_for(model, engine_opts)
        except (InvalidParameterError, ValueError) as exc:
            raise _bad_request(str(exc), model) from None
        self.lora = lora_for(model, engine_opts, lora_spec) if lora_spec is not None else None
        tool_args = {name: sampling.pop(name, None) for name in TOOL_PARAMS}
        template_kwargs = sampling.pop("chat_template_kwargs", None)
        self.params = sampling_params(sampling, model)
        tokenizer = self.engine.tokenizer
        self.images = None
        self.plan = None  # a chat's ChatPlan (tools, reasoning)
        if (litellm_params or {}).get("text_completion"):
            if any(v is not None for v in tool_args.values()) or template_kwargs is not None:
                name = next(k for k, v in {**tool_args, "chat_template_kwargs": template_kwargs}.items()
                            if v is not None)
                raise _bad_request(f"{name}: only for chat completions", model)
            prompt = message_text(messages[0]["content"], model, "prompt") if messages else ""
        else:
            from dashinfer_core.chat import plan_chat
            chat = conversation(messages, model)
            self.images = conversation_images(chat) or None
            if self.images and self.engine.engine.images is None:
                raise _bad_request("images: this model takes text only (the messages carry image_url parts)", model)
            if template_kwargs is not None and not isinstance(template_kwargs, dict):
                raise _bad_request("chat_template_kwargs: must be an object", model)
            try:
                with self.engine.engine.tokenizer_lock:
                    self.plan = plan_chat(tokenizer, chat, self.params, tool_args["tools"], tool_args["tool_choice"],
                                          tool_args["parallel_tool_calls"], template_kwargs)
            except InvalidParameterError as exc:
                raise _bad_request(str(exc), model) from None
            prompt, self.params = self.plan.prompt_ids, self.plan.params
        self.request_id = f"litellm-{uuid.uuid4().hex}"
        try:  # validate now (prompt length, limits): raises before anything is queued
            self.engine.engine.build_request(self.request_id, prompt, self.params, lora_request=self.lora,
                                             images=self.images)
        except PromptTooLongError as exc:
            raise litellm.ContextWindowExceededError(message=str(exc), model=model, llm_provider=PROVIDER) from None
        except InvalidParameterError as exc:
            raise _bad_request(str(exc), model) from None
        self.prompt = prompt

    async def outputs(self):
        try:
            async for out in self.engine.generate(self.prompt, self.params, request_id=self.request_id,
                                                  lora_request=self.lora, images=self.images):
                yield out
        except RequestFailedError as exc:
            if exc.is_client_error:
                raise _bad_request(exc.message, self.model) from None
            raise litellm.InternalServerError(message=str(exc), model=self.model, llm_provider=PROVIDER) from None
        except EngineDeadError as exc:
            raise litellm.InternalServerError(message=str(exc), model=self.model, llm_provider=PROVIDER) from None


def _usage(out) -> dict:
    return {"prompt_tokens": len(out.prompt_token_ids), "completion_tokens": out.num_completion_tokens,
            "total_tokens": len(out.prompt_token_ids) + out.num_completion_tokens,
            "prompt_tokens_details": {"cached_tokens": out.num_cached_tokens}}


def _logprobs(engine, completion) -> dict | None:
    if completion.logprobs is None:
        return None
    tok = engine.tokenizer
    content = []
    with engine.engine.tokenizer_lock:
        for token_id, entry in zip(completion.token_ids, completion.logprobs):
            def item(t, lp):
                text = tok.decode([t])
                return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}
            content.append({**item(token_id, entry.get(token_id)),
                            "top_logprobs": [item(t, lp) for t, lp in entry.items()]})
    return {"content": content}


def _message(call: _Call, completion) -> tuple:
    """(litellm Message, finish_reason) of one finished completion: reasoning and tool calls split off."""
    from litellm.types.utils import ChatCompletionMessageToolCall, Function, Message
    reason = completion.finish_reason or "stop"
    if call.plan is None or (call.plan.tools is None and not call.plan.reasoning):
        return Message(role="assistant", content=completion.text), reason
    from dashinfer_core.chat import parse_chat_output
    parsed = parse_chat_output(call.plan, completion.text)
    calls = [ChatCompletionMessageToolCall(id=c.id, type="function", function=Function(name=c.name,
                                                                                      arguments=c.arguments))
             for c in parsed.tool_calls] or None
    message = Message(role="assistant", content=parsed.content, tool_calls=calls,
                      reasoning_content=parsed.reasoning_content)
    return message, parsed.finish_reason(reason)


def _fill_response(model_response: ModelResponse, call: _Call, out) -> ModelResponse:
    from litellm.types.utils import Choices, Usage
    choices = []
    for c in out.outputs:
        message, reason = _message(call, c)
        choices.append(Choices(index=c.index, finish_reason=reason, message=message,
                               logprobs=_logprobs(call.engine, c)))
    model_response.choices = choices
    model_response.usage = Usage(**_usage(out))
    model_response.model = f"{PROVIDER}/{call.model}"
    model_response.created = int(time.time())
    return model_response


class _LoopThread:
    """A private event loop for the synchronous entry points (litellm.completion, streaming)."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="dashinfer-litellm-loop", daemon=True).start()

    def run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()


class DashInferLLM(CustomLLM):
    def __init__(self):
        super().__init__()
        self._loop: _LoopThread | None = None
        self._loop_lock = threading.Lock()

    def _sync_loop(self) -> _LoopThread:
        with self._loop_lock:
            if self._loop is None:
                self._loop = _LoopThread()
            return self._loop

    # ---- non-streaming ---------------------------------------------------------------------------
    async def acompletion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                          api_key, logging_obj, optional_params, acompletion=None, litellm_params=None,
                          logger_fn=None, headers={}, timeout=None, client=None) -> ModelResponse:
        call = _Call(model, messages, optional_params, litellm_params)
        last = None
        async for out in call.outputs():
            last = out
        return _fill_response(model_response, call, last)

    def completion(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                   api_key, logging_obj, optional_params, acompletion=None, litellm_params=None, logger_fn=None,
                   headers={}, timeout=None, client=None) -> ModelResponse:
        return self._sync_loop().run(self.acompletion(model, messages, api_base, custom_prompt_dict, model_response,
                                                      print_verbose, encoding, api_key, logging_obj, optional_params,
                                                      acompletion, litellm_params, logger_fn, headers, timeout, client))

    # ---- streaming -------------------------------------------------------------------------------
    def astreaming(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                   api_key, logging_obj, optional_params, acompletion=None, litellm_params=None, logger_fn=None,
                   headers={}, timeout=None, client=None):
        # Validate here, before the stream exists: a bad request raises now (proper HTTP status)
        # instead of inside an already-started 200 response.
        call = _Call(model, messages, optional_params, litellm_params)
        return self._chunks(call)

    async def _chunks(self, call: _Call):
        if call.plan is not None and (call.plan.tools is not None or call.plan.reasoning):
            async for chunk in self._split_chunks(call):
                yield chunk
            return
        sent = {}
        async for out in call.outputs():
            for c in out.outputs:
                if c.delta_text or (c.finished and not sent.get(c.index)):
                    sent[c.index] = True
                    yield GenericStreamingChunk(text=c.delta_text, is_finished=False, finish_reason="", usage=None,
                                                index=c.index, tool_use=None)
            if out.finished:
                for c in out.outputs:
                    yield GenericStreamingChunk(text="", is_finished=True, finish_reason=c.finish_reason or "stop",
                                                usage=_usage(out), index=c.index, tool_use=None)

    async def _split_chunks(self, call: _Call):
        """A chat with tools or a reasoning model: content and tool-call deltas (one per chunk, LiteLLM's
        tool_use), reasoning as chunks of their own with delta.reasoning_content."""
        from dashinfer_core.chat import ChatStreamParser
        parsers, called = {}, {}
        async for out in call.outputs():
            for c in out.outputs:
                parser = parsers.setdefault(c.index, ChatStreamParser(call.plan))
                delta = parser.finish(c.text) if c.finished else parser.feed(c.text)
                if delta.reasoning:  # a whole chunk: LiteLLM's generic chunk has no reasoning field
                    yield ModelResponseStream(model=call.model, choices=[StreamingChoices(
                        index=c.index, delta=Delta(reasoning_content=delta.reasoning, content=None))])
                if delta.content:
                    yield GenericStreamingChunk(text=delta.content, is_finished=False, finish_reason="", usage=None,
                                                index=c.index, tool_use=None)
                for tool_delta in delta.tool_calls:
                    called[c.index] = True
                    yield GenericStreamingChunk(text="", is_finished=False, finish_reason="", usage=None,
                                                index=c.index, tool_use=tool_delta)
            if out.finished:
                for c in out.outputs:
                    reason = c.finish_reason or "stop"
                    reason = "tool_calls" if called.get(c.index) and reason == "stop" else reason
                    yield GenericStreamingChunk(text="", is_finished=True, finish_reason=reason,
                                                usage=_usage(out), index=c.index, tool_use=None)

    def streaming(self, model, messages, api_base, custom_prompt_dict, model_response, print_verbose, encoding,
                  api_key, logging_obj, optional_params, acompletion=None, litellm_params=None, logger_fn=None,
                  headers={}, timeout=None, client=None):
        call = _Call(model, messages, optional_params, litellm_params)
        loop = self._sync_loop()
        agen = self._chunks(call)

        def iterate():
            try:
                while True:
                    try:
                        yield loop.run(agen.__anext__())
                    except StopAsyncIteration:
                        return
            finally:  # the caller stopped early: close the stream, which aborts the request
                loop.run(agen.aclose())
        return iterate()


    # ---- embeddings -------------------------------------------------------------------------------
    async def aembedding(self, model, input, model_response, print_verbose, logging_obj, optional_params,
                         api_key=None, api_base=None, timeout=None, litellm_params=None, client=None):
        """Embeddings from the same engine as the model's completions (batched with them): the final
        hidden states pooled (`pooling`: last, the default, or mean) and L2-normalised (`normalize`)."""
        from dashinfer_core.pooling import PoolingParams, to_base64
        params = dict(optional_params or {})
        lora_spec = params.pop("lora", None)
        engine_opts, rest = split_params(params, model)
        if lora_spec is not None:
            engine_opts["enable_lora"] = True
        pooling = rest.pop("pooling", "last")
        normalize = rest.pop("normalize", True)
        encoding = rest.pop("encoding_format", None) or "float"
        if rest:
            first = sorted(rest)[0]
            message = "the embedding size is the model's hidden size; it cannot be changed" \
                if first == "dimensions" else "not a parameter of embeddings here"
            raise _bad_request(f"{first}: {message}", model)
        if encoding not in ("float", "base64"):
            raise _bad_request(f"encoding_format: must be float or base64, got {encoding!r}", model)
        texts = [input] if isinstance(input, str) else input
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
            raise _bad_request("input: must be a non-empty string or a list of non-empty strings", model)
        try:
            pooling_params = PoolingParams(pooling, normalize)
            engine = engine_for(model, engine_opts)
            lora = lora_for(model, engine_opts, lora_spec) if lora_spec is not None else None
            outs = await asyncio.gather(*(engine.embed(text, pooling_params, lora_request=lora) for text in texts))
        except PromptTooLongError as exc:
            raise litellm.ContextWindowExceededError(message=str(exc), model=model, llm_provider=PROVIDER) from None
        except InvalidParameterError as exc:
            raise _bad_request(str(exc), model) from None
        except RequestFailedError as exc:
            if exc.is_client_error:
                raise _bad_request(exc.message, model) from None
            raise litellm.InternalServerError(message=str(exc), model=model, llm_provider=PROVIDER) from None
        except EngineDeadError as exc:
            raise litellm.InternalServerError(message=str(exc), model=model, llm_provider=PROVIDER) from None
        from litellm.types.utils import Usage
        data = []
        for i, out in enumerate(outs):
            vector = out.embedding if encoding == "float" else to_base64(out.embedding)
            data.append({"object": "embedding", "index": i, "embedding": vector})
        tokens = sum(len(out.prompt_token_ids) for out in outs)
        model_response.data = data
        model_response.model = f"{PROVIDER}/{model}"
        model_response.usage = Usage(prompt_tokens=tokens, completion_tokens=0, total_tokens=tokens)
        return model_response

    def embedding(self, model, input, model_response, print_verbose, logging_obj, optional_params, api_key=None,
                  api_base=None, timeout=None, litellm_params=None, client=None):
        return self._sync_loop().run(self.aembedding(model, input, model_response, print_verbose, logging_obj,
                                                     optional_params, api_key, api_base, timeout, litellm_params))


handler = DashInferLLM()


def register() -> None:
    """Make `dashinfer/<model>` available to litellm.completion / acompletion in this process."""
    entry = {"provider": PROVIDER, "custom_handler": handler}
    if not any(p.get("provider") == PROVIDER for p in litellm.custom_provider_map):
        litellm.custom_provider_map.append(entry)
    from litellm.utils import custom_llm_setup
    custom_llm_setup()


def _serve_stats(port: int) -> None:
    """Engine stats as JSON on 127.0.0.1:port (DASHINFER_STATS_PORT), and the Prometheus metrics at
    /metrics there, for operators and tests."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path.split("?")[0] == "/metrics":
                body, content_type = metrics().exposition()
            else:
                body, content_type = json.dumps(engine_stats()).encode(), "application/json"
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="dashinfer-stats", daemon=True).start()


if os.environ.get("DASHINFER_STATS_PORT"):
    _serve_stats(int(os.environ["DASHINFER_STATS_PORT"]))
