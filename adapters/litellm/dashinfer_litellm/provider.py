"""The LiteLLM CustomLLM provider.

One AsyncEngine per (model, engine options), created on first use and shared by every request, so
concurrent requests are batched continuously. Engine options come from the model entry's
litellm_params (any EngineConfig field: dtype, device, max_num_seqs, block_size, kv_cache_memory,
enable_prefix_caching, ...); everything else is a sampling parameter. Errors become LiteLLM
exceptions with the right HTTP status (400 bad parameter, 400 context window, 500 engine failure);
for streams they are raised before the first chunk, so the proxy can still answer with that status.
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
from litellm.types.utils import GenericStreamingChunk, ModelResponse

from dashinfer_core import (AsyncEngine, EngineConfig, EngineDeadError, InvalidParameterError, PromptTooLongError,
                            RequestFailedError, SamplingParams)
from dashinfer_core.llm import apply_chat_template

PROVIDER = "dashinfer"
# EngineConfig fields a model entry may set. `seed` is left out: in a request it is the sampling seed.
ENGINE_FIELDS = {f.name for f in fields(EngineConfig)} - {"model", "seed", "skip_tokenizer_init"}
# OpenAI / LiteLLM parameters that do not affect generation here.
IGNORED_PARAMS = {"stream", "stream_options", "user", "extra_body", "metadata", "tools", "tool_choice",
                  "parallel_tool_calls", "functions", "function_call", "max_retries", "timeout", "api_base",
                  "api_key", "extra_headers", "logit_bias", "service_tier", "store"}

_engines: dict[tuple, AsyncEngine] = {}
_engines_lock = threading.Lock()


def engine_for(model: str, options: dict) -> AsyncEngine:
    key = (model, tuple(sorted((k, repr(v)) for k, v in options.items())))
    with _engines_lock:
        engine = _engines.get(key)
        if engine is None or not engine.is_running:
            config = EngineConfig(model=None if model in ("", "default") else model, **options)
            engine = _engines[key] = AsyncEngine(config)
        return engine


def engine_stats() -> dict:
    """Stats of every engine this process runs, keyed by model."""
    return {f"{key[0]}{list(key[1]) or ''}": asdict(engine.get_stats()) for key, engine in list(_engines.items())}


def _bad_request(message: str, model: str):
    return litellm.BadRequestError(message=message, model=model, llm_provider=PROVIDER)


def split_params(optional_params: dict, model: str) -> tuple[dict, dict]:
    """(engine options, SamplingParams kwargs) from LiteLLM's optional_params."""
    engine_opts, sampling = {}, {}
    for key, value in optional_params.items():
        if key in ENGINE_FIELDS:
            engine_opts[key] = value
        elif key not in IGNORED_PARAMS and value is not None:
            sampling[key] = value
    return engine_opts, sampling


def sampling_params(params: dict, model: str) -> SamplingParams:
    params = dict(params)
    kwargs = {}
    for ours, theirs in (("max_tokens", "max_tokens"), ("max_tokens", "max_completion_tokens"),
                         ("temperature", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"),
                         ("min_p", "min_p"), ("presence_penalty", "presence_penalty"),
                         ("frequency_penalty", "frequency_penalty"), ("repetition_penalty", "repetition_penalty"),
                         ("seed", "seed"), ("n", "n"), ("stop", "stop"), ("min_tokens", "min_tokens"),
                         ("ignore_eos", "ignore_eos"), ("json_schema", "json_schema"), ("regex", "regex"),
                         ("choice", "choice")):
        if theirs in params:
            kwargs[ours] = params.pop(theirs)
    kwargs.setdefault("max_tokens", 256)
    logprobs = params.pop("logprobs", None)
    top_logprobs = params.pop("top_logprobs", None)
    if isinstance(logprobs, bool):  # chat: logprobs=True plus top_logprobs=N
        if logprobs:
            kwargs["logprobs"] = int(top_logprobs or 0)
    elif logprobs is not None:  # text completions: logprobs=N is the count
        kwargs["logprobs"] = logprobs
    response_format = params.pop("response_format", None)
    if params:
        raise _bad_request(f"{sorted(params)[0]}: not a parameter this provider understands "
                           f"(unknown: {sorted(params)})", model)
    try:
        return SamplingParams.from_response_format(response_format, **kwargs)
    except InvalidParameterError as exc:
        raise _bad_request(str(exc), model) from None
    except TypeError as exc:
        raise _bad_request(str(exc), model) from None


def message_text(content) -> str:
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content or ""


class _Call:
    """One request: validated and tokenized up front, so errors surface before any output."""

    def __init__(self, model: str, messages: list, optional_params: dict, litellm_params: dict | None):
        self.model = model
        engine_opts, sampling = split_params(optional_params or {}, model)
        try:
            self.engine = engine_for(model, engine_opts)
        except (InvalidParameterError, ValueError) as exc:
            raise _bad_request(str(exc), model) from None
        self.params = sampling_params(sampling, model)
        tokenizer = self.engine.tokenizer
        if (litellm_params or {}).get("text_completion"):
            prompt = message_text(messages[0]["content"]) if messages else ""
        else:
            conversation = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
            try:
                with self.engine.engine.tokenizer_lock:
                    prompt = apply_chat_template(tokenizer, conversation)
            except Exception as exc:
                raise _bad_request(f"messages: {exc}", model) from None
        self.request_id = f"litellm-{uuid.uuid4().hex}"
        try:  # validate now (prompt length, limits): raises before anything is queued
            self.engine.engine.build_request(self.request_id, prompt, self.params)
        except PromptTooLongError as exc:
            raise litellm.ContextWindowExceededError(message=str(exc), model=model, llm_provider=PROVIDER) from None
        except InvalidParameterError as exc:
            raise _bad_request(str(exc), model) from None
        self.prompt = prompt

    async def outputs(self):
        try:
            async for out in self.engine.generate(self.prompt, self.params, request_id=self.request_id):
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


def _fill_response(model_response: ModelResponse, call: _Call, out) -> ModelResponse:
    from litellm.types.utils import Choices, Message, Usage
    model_response.choices = [
        Choices(index=c.index, finish_reason=c.finish_reason or "stop",
                message=Message(role="assistant", content=c.text), logprobs=_logprobs(call.engine, c))
        for c in out.outputs]
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


handler = DashInferLLM()


def register() -> None:
    """Make `dashinfer/<model>` available to litellm.completion / acompletion in this process."""
    entry = {"provider": PROVIDER, "custom_handler": handler}
    if not any(p.get("provider") == PROVIDER for p in litellm.custom_provider_map):
        litellm.custom_provider_map.append(entry)
    from litellm.utils import custom_llm_setup
    custom_llm_setup()


def _serve_stats(port: int) -> None:
    """Engine stats as JSON on 127.0.0.1:port (DASHINFER_STATS_PORT), for operators and tests."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            body = json.dumps(engine_stats()).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="dashinfer-stats", daemon=True).start()


if os.environ.get("DASHINFER_STATS_PORT"):
    _serve_stats(int(os.environ["DASHINFER_STATS_PORT"]))
