"""Request-body limits for the HTTP servers: a body over the limit gets 413 before it is read whole,
and a worker body that is not JSON (or not UTF-8) gets 400 naming the problem."""
from __future__ import annotations

import json
import os

from fastapi import Request
from fastapi.responses import JSONResponse

# 8 MiB: far more than any prompt the context window admits, far less than what would hurt a server.
MAX_BODY_BYTES = int(os.environ.get("DASHINFER_MAX_BODY_BYTES", 8 << 20))
VALIDATION_ERROR = 40001  # FastChat's ErrorCode.VALIDATION_TYPE_ERROR


class BodyTooLarge(Exception):
    pass


class BodyLimitMiddleware:
    """Pure ASGI middleware: refuse bodies over `limit` bytes (declared or streamed) with 413."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge()
            return message

        try:
            await self.app(scope, limited_receive, send)
        except BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        body = json.dumps({"text": f"body: larger than the {self.limit}-byte limit", "error_code": VALIDATION_ERROR,
                           "message": f"request body larger than the {self.limit}-byte limit"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


async def json_body(request: Request) -> dict | JSONResponse:
    """The request's JSON object, or a 400 response that says what is wrong with it."""
    raw = await request.body()
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        return JSONResponse({"text": f"body: not UTF-8 ({exc.reason} at byte {exc.start})",
                             "error_code": VALIDATION_ERROR}, status_code=400)
    except json.JSONDecodeError as exc:
        return JSONResponse({"text": f"body: malformed JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
                             "error_code": VALIDATION_ERROR}, status_code=400)
    if not isinstance(data, dict):
        return JSONResponse({"text": "body: must be a JSON object", "error_code": VALIDATION_ERROR}, status_code=400)
    return data
