"""A non-streamed request ends when its client goes. Starlette runs a handler to its end whatever the client
does; a streamed response stops when the client is gone, but a non-streamed generation would go on (holding
its KV blocks and its share of every step) for nobody, for minutes at a long max_tokens."""
from __future__ import annotations

import asyncio
import contextlib

from starlette.requests import Request

CLIENT_CLOSED_REQUEST = 499  # what is answered (to nobody) once the client has gone (nginx's code)


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone. Only once the body has been read: receive() then yields nothing else."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_disconnected(request: Request, work):
    """Await the coroutine `work`, cancelled if the client disconnects first (its own clean-up, an abort of
    its request, has run when this returns). Returns its result, or None when the client has gone."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
    finally:  # (a cancellation of the caller cancels both)
        gone.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    return None if task.cancelled() else task.result()
