"""FastChat's own OpenAI-compatible API server (`fastchat.serve.openai_api_server`, same flags),
with streaming working under pydantic 2, request bodies bounded (DASHINFER_MAX_BODY_BYTES, default
8 MiB: 413 beyond), and every request field either honoured or refused.

FastChat 0.2.36 serialises stream chunks with `model.json(exclude_unset=True, ensure_ascii=False)`,
pydantic 1's signature; pydantic 2 rejects the keyword arguments (FastChat #3140 / #3299), so every
streamed response fails. This launcher gives FastChat's protocol models a `json()` that accepts them.

FastChat's server also forwards a fixed list of fields to the worker and drops the rest. Here its
/v1/chat/completions and /v1/completions first check the raw body (openai_fields.py): response_format
(json_object, json_schema), the guided fields (json_schema, regex, choice, or vLLM's guided_json,
guided_regex, guided_choice, structured_outputs), seed, min_p, repetition_penalty, min_tokens,
ignore_eos and max_completion_tokens reach the worker; a field the stack cannot honour (logit_bias,
the deprecated functions, ...) answers 400 naming it. /v1/chat/completions itself is chat_route.py:
FastChat's steps plus tools and tool_choice (the worker renders the messages with the model's own
template), tool_calls, reasoning_content and stream_options.include_usage. The rest is FastChat's
server, unmodified.

    python -m dashinfer_fastchat.openai_api_server --host 127.0.0.1 --port 8000 \\
        --controller-address http://127.0.0.1:21001
"""
from __future__ import annotations

import inspect
import json
import os
from contextvars import ContextVar
from typing import TYPE_CHECKING

from pydantic import BaseModel

if TYPE_CHECKING:
    from fastapi.responses import JSONResponse


def _json_v1_compatible(self, *, include=None, exclude=None, exclude_unset=False, exclude_defaults=False,
                        exclude_none=False, ensure_ascii=True, **_ignored):
    data = self.model_dump(mode="json", include=include, exclude=exclude, exclude_unset=exclude_unset,
                           exclude_defaults=exclude_defaults, exclude_none=exclude_none)
    return json.dumps(data, ensure_ascii=ensure_ascii)


def patch_fastchat_protocol() -> int:
    """Give every pydantic model of FastChat's protocol modules the v1-compatible json(); returns how many."""
    from fastchat.protocol import api_protocol, openai_api_protocol
    patched = 0
    for module in (openai_api_protocol, api_protocol):
        for obj in vars(module).values():
            if isinstance(obj, type) and issubclass(obj, BaseModel) and obj is not BaseModel:
                obj.json = _json_v1_compatible
                patched += 1
    return patched


MAX_N = 128  # the engine's own limit on completions per request
# Worker parameters of the request being served, beyond the ones FastChat's server forwards itself
# (set per request by the route wrapper, read by the patched get_gen_params; each request runs in
# its own task, so its context holds its own value).
_EXTRA_PARAMS: ContextVar[dict] = ContextVar("dashinfer_extra_worker_params", default={})


def error_response(param: str, message: str) -> "JSONResponse":
    """HTTP 400 in OpenAI's error shape, `param` naming the field."""
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": "invalid_request_error", "param": param,
                                   "code": "unsupported_parameter"}}, status_code=400)


def forward_extra_params(server) -> None:
    """Make FastChat's get_gen_params (looked up as a module global by its routes) add the request's
    extra worker parameters to the payload it builds."""
    original = server.get_gen_params
    if getattr(original, "_dashinfer", False):
        return

    async def get_gen_params(*args, **kwargs):
        params = await original(*args, **kwargs)
        params.update(_EXTRA_PARAMS.get())
        return params
    get_gen_params._dashinfer = True
    server.get_gen_params = get_gen_params


class LogprobsTrimmer:
    """FastChat's streamed /v1/completions sends each choice's logprobs from its first token in every chunk
    (the worker's are cumulative, as its text is): keep only the tokens not sent yet, per choice. Only for one
    prompt: with several, FastChat numbers every prompt's choices from 0 and holds finish chunks to the end,
    so a chunk's choice cannot be told apart."""

    def __init__(self):
        self.sent: dict[int, int] = {}  # choice index -> tokens whose logprobs were sent

    def __call__(self, chunk):
        text = chunk if isinstance(chunk, str) else chunk.decode()
        if not text.startswith("data: {") or '"logprobs"' not in text:
            return chunk
        body = json.loads(text[len("data: "):])
        for choice in body.get("choices") or []:
            logprobs = choice.get("logprobs")
            if not isinstance(logprobs, dict) or not isinstance(logprobs.get("tokens"), list):
                continue
            start, total = self.sent.get(choice.get("index", 0), 0), len(logprobs["tokens"])
            for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                if isinstance(logprobs.get(key), list):
                    logprobs[key] = logprobs[key][start:]
            self.sent[choice.get("index", 0)] = max(start, total)
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


def checked_routes(app, peek: int = 2) -> None:
    """Wrap FastChat's /v1/chat/completions, /v1/completions and /v1/embeddings (whose body is checked:
    text input only, no `dimensions`):
    - the raw body is checked first (openai_fields.check_request): a field the stack cannot honour
      answers 400 naming it; the ones FastChat's server does not forward (response_format, the
      guided fields, seed, ...) go to the worker with the payload;
    - `n` is bounded (FastChat sends n separate requests);
    - FastChat streams a worker's error (bad parameter, context overflow) inside a 200 response: the
      first chunks are read before answering, so an error among them becomes a plain HTTP 400 with
      FastChat's error body, as the non-streaming routes do."""
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from fastapi.routing import APIRoute
    from starlette.requests import Request

    from .chat_route import chat_completion
    from .disconnect import CLIENT_CLOSED_REQUEST, unless_disconnected
    from .openai_fields import FieldError, check_embeddings_request, check_request

    def wrap(endpoint, chat: bool):
        async def wrapped(*args, raw_request: Request, **kwargs):
            request = kwargs.get("request")
            try:
                body = await raw_request.json()
            except ValueError as exc:  # not UTF-8, not JSON (the chat route parses the body itself)
                return JSONResponse({"object": "error", "message": f"the request body is not valid JSON: {exc}",
                                     "code": 40001}, status_code=400)
            try:
                extras, changes = check_request(body if isinstance(body, dict) else {}, chat)
            except FieldError as exc:
                return error_response(exc.param, str(exc))
            if chat and not isinstance(body, dict):
                return JSONResponse({"object": "error", "message": "the request body must be a JSON object",
                                     "code": 40001}, status_code=400)
            if chat:  # FastChat's request model, built here from the checked body (it cannot hold tool turns)
                from fastchat.protocol.openai_api_protocol import ChatCompletionRequest
                from pydantic import ValidationError
                names = ChatCompletionRequest.model_fields
                try:
                    request = ChatCompletionRequest(**{k: v for k, v in {**body, **changes}.items()
                                                       if k in names and v is not None})
                except ValidationError as exc:
                    return JSONResponse({"object": "error", "message": str(exc), "code": 40001}, status_code=400)
                kwargs["request"] = request
                options = body.get("stream_options") or {}
                include_usage = bool(options.get("include_usage"))
            else:
                for name, value in changes.items():
                    setattr(request, name, value)
            n = getattr(request, "n", None)
            if isinstance(n, int) and n > MAX_N:
                return JSONResponse({"object": "error", "message": f"n: must be <= {MAX_N}, got {n}",
                                     "code": 40302}, status_code=400)
            _EXTRA_PARAMS.set(extras)  # (the task below runs in a copy of this context)
            response = await unless_disconnected(
                raw_request, chat_completion(request, include_usage) if chat else endpoint(*args, **kwargs))
            if response is None:  # the client has gone: its generation was cancelled (and aborted by the worker)
                return Response(status_code=CLIENT_CLOSED_REQUEST)
            if not isinstance(response, StreamingResponse):
                usage = getattr(response, "usage", None)
                if not chat and isinstance(n, int) and n > 1 and usage is not None:
                    # FastChat adds up the usage of the n requests it sends per prompt: each prompt counted n times
                    usage.prompt_tokens //= n
                    usage.total_tokens = usage.prompt_tokens + (usage.completion_tokens or 0)
                return response
            iterator = response.body_iterator
            head = []
            async for chunk in iterator:
                head.append(chunk)
                text = chunk if isinstance(chunk, str) else chunk.decode()
                if text.startswith("data: {") and '"error_code"' in text:
                    body = json.loads(text[len("data: "):])
                    if body.get("error_code"):
                        await iterator.aclose()
                        return JSONResponse({"object": "error", "message": body.get("text", ""),
                                             "code": body["error_code"]}, status_code=400)
                if len(head) >= peek:
                    break

            prompt = getattr(request, "prompt", None)
            single_prompt = isinstance(prompt, str) or (isinstance(prompt, list) and len(prompt) == 1)
            trim = LogprobsTrimmer() if not chat and getattr(request, "logprobs", None) is not None and \
                single_prompt else None

            async def replay():
                for chunk in head:
                    yield chunk if trim is None else trim(chunk)
                async for chunk in iterator:
                    yield chunk if trim is None else trim(chunk)
            return StreamingResponse(replay(), media_type=response.media_type)
        signature = inspect.signature(endpoint)
        kept = [p for p in signature.parameters.values() if not (chat and p.name == "request")]
        wrapped.__signature__ = signature.replace(parameters=[
            *kept, inspect.Parameter("raw_request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)])
        return wrapped

    def wrap_embeddings(endpoint):
        async def wrapped(*args, raw_request: Request, **kwargs):
            try:
                body = await raw_request.json()
                check_embeddings_request(body if isinstance(body, dict) else {})
            except FieldError as exc:
                return error_response(exc.param, str(exc))
            except ValueError as exc:
                return JSONResponse({"object": "error", "message": f"the request body is not valid JSON: {exc}",
                                     "code": 40001}, status_code=400)
            return await endpoint(*args, **kwargs)
        signature = inspect.signature(endpoint)
        wrapped.__signature__ = signature.replace(parameters=[
            *signature.parameters.values(),
            inspect.Parameter("raw_request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)])
        return wrapped

    for i, route in enumerate(app.router.routes):
        if not isinstance(route, APIRoute):
            continue
        if route.path in ("/v1/chat/completions", "/v1/completions"):
            endpoint = wrap(route.endpoint, route.path == "/v1/chat/completions")
        elif route.path in ("/v1/embeddings", "/v1/engines/{model_name}/embeddings"):
            endpoint = wrap_embeddings(route.endpoint)
        else:
            continue
        app.router.routes[i] = APIRoute(route.path, endpoint, methods=list(route.methods),
                                        dependencies=route.dependencies, name=route.name)


WORKER_WAIT_SECONDS = 3 * 3600  # FastChat's own bound on a non-streamed worker call (its aiohttp total timeout)


def patch_worker_timeout(server) -> None:
    """FastChat's server gives up on a stream whose worker sends nothing for FASTCHAT_WORKER_API_TIMEOUT seconds
    (100 by default) and answers a plain-text 500: a streamed request still queued behind long prompts on a
    slow CPU met it (found by a black-box pass). The worker queues rather than fails, and a client that gives
    up disconnects, which aborts its request: wait as long as for a non-streamed call, unless told otherwise."""
    if "FASTCHAT_WORKER_API_TIMEOUT" not in os.environ:
        server.WORKER_API_TIMEOUT = WORKER_WAIT_SECONDS


def main() -> None:
    import uvicorn
    patch_fastchat_protocol()
    from fastchat.serve import openai_api_server as server

    from .limits import BodyLimitMiddleware
    args = server.create_openai_api_server()
    patch_worker_timeout(server)
    server.app.add_middleware(BodyLimitMiddleware)
    forward_extra_params(server)
    checked_routes(server.app)
    ssl = dict(ssl_keyfile=os.environ["SSL_KEYFILE"], ssl_certfile=os.environ["SSL_CERTFILE"]) if args.ssl else {}
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=os.environ.get("DASHINFER_LOG_LEVEL", "warning"),
                **ssl)


if __name__ == "__main__":
    main()
