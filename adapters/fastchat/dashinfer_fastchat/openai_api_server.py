"""FastChat's own OpenAI-compatible API server (`fastchat.serve.openai_api_server`, same flags),
with streaming working under pydantic 2.

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


def main() -> None:
    import uvicorn
    patch_fastchat_protocol()
    from fastchat.serve import openai_api_server as server
    args = server.create_openai_api_server()
    ssl = dict(ssl_keyfile=os.environ["SSL_KEYFILE"], ssl_certfile=os.environ["SSL_CERTFILE"]) if args.ssl else {}
    uvicorn.run(server.app, host=args.host, port=args.port, log_level=os.environ.get("DASHINFER_LOG_LEVEL", "warning"),
                **ssl)


if __name__ == "__main__":
    main()
