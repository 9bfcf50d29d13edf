"""FastChat's own OpenAI-compatible API server (`fastchat.serve.openai_api_server`, same flags),
with streaming working under pydantic 2, and request bodies bounded (DASHINFER_MAX_BODY_BYTES,
default 8 MiB: 413 beyond).

FastChat 0.2.36 serialises stream chunks with `model.json(exclude_unset=True, ensure_ascii=False)`,
pydantic 1's signature; pydantic 2 rejects the keyword arguments (FastChat #3140 / #3299), so every
streamed response fails. This launcher gives FastChat's protocol models a `json()` that accepts them,
then runs the unmodified server.

    python -m dashinfer_fastchat.openai_api_server --host 127.0.0.1 --port 8000 \\
        --controller-address http://127.0.0.1:21001
"""
from __future__ import annotations

import json
import os

from pydantic import BaseModel


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


def errors_before_streaming(app, peek: int = 2) -> None:
    """Also bounds `n`. FastChat streams a worker's error (bad parameter, context overflow) inside a 200 response. Wrap
    the two streaming routes so the first chunks are read before answering: an error among them
    becomes a plain HTTP 400 with FastChat's error body, as the non-streaming routes do."""
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastapi.routing import APIRoute

    def wrap(endpoint):
        async def wrapped(*args, **kwargs):
            request = kwargs.get("request")
            n = getattr(request, "n", None)
            if isinstance(n, int) and n > MAX_N:  # FastChat sends n separate requests: bound it
                return JSONResponse({"object": "error", "message": f"n: must be <= {MAX_N}, got {n}",
                                     "code": 40302}, status_code=400)
            response = await endpoint(*args, **kwargs)
            if not isinstance(response, StreamingResponse):
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

            async def replay():
                for chunk in head:
                    yield chunk
                async for chunk in iterator:
                    yield chunk
            return StreamingResponse(replay(), media_type=response.media_type)
        wrapped.__signature__ = __import__("inspect").signature(endpoint)
        return wrapped

    for route in app.router.routes:
        if isinstance(route, APIRoute) and route.path in ("/v1/chat/completions", "/v1/completions"):
            route.endpoint = wrap(route.endpoint)
            route.dependant.call = route.endpoint
            route.app = __import__("fastapi").routing.request_response(route.get_route_handler())


def main() -> None:
    import uvicorn
    patch_fastchat_protocol()
    from fastchat.serve import openai_api_server as server

    from .limits import BodyLimitMiddleware
    args = server.create_openai_api_server()
    server.app.add_middleware(BodyLimitMiddleware)
    errors_before_streaming(server.app)
    ssl = dict(ssl_keyfile=os.environ["SSL_KEYFILE"], ssl_certfile=os.environ["SSL_CERTFILE"]) if args.ssl else {}
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=os.environ.get("DASHINFER_LOG_LEVEL", "warning"),
                **ssl)


if __name__ == "__main__":
    main()
