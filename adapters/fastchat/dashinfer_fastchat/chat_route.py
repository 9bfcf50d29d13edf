"""/v1/chat/completions for FastChat's OpenAI server, in place of its own route: the same steps (model
check, request checks, FastChat's generation parameters, its length check, one worker request per
choice), and what its route drops: `tool_calls` (finish_reason `tool_calls`, streamed as OpenAI's
tool-call deltas), a reasoning model's `reasoning_content`, the usage chunk of
`stream_options.include_usage`, and cached prompt tokens in usage.

The worker (dashinfer_fastchat.worker) renders the messages with the model's chat template and splits
the output; its chunks carry cumulative `text` (the content), `reasoning_content` and every
`tool_call_deltas` so far.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid


def _usage(chunks: list[dict]) -> dict:
    """OpenAI usage over a request's choices: the prompt counted once."""
    first = chunks[0].get("usage") or {}
    completion = sum((c.get("usage") or {}).get("completion_tokens", 0) for c in chunks)
    prompt = first.get("prompt_tokens", 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": first.get("cached_tokens", 0)}}


def _message(content: dict) -> dict:
    message = {"role": "assistant", "content": content.get("text")}
    if content.get("reasoning_content"):
        message["reasoning_content"] = content["reasoning_content"]
    calls = _assemble(content.get("tool_call_deltas") or [])
    if calls:
        message["tool_calls"] = calls
        message["content"] = content.get("text") or None
    return message


def _assemble(deltas: list[dict]) -> list[dict]:
    """Tool-call deltas joined into whole calls (OpenAI's non-streamed shape)."""
    calls: list[dict] = []
    for delta in deltas:
        if "id" in delta:
            calls.append({"id": delta["id"], "type": "function",
                          "function": {"name": delta["function"]["name"], "arguments": ""}})
        calls[delta["index"]]["function"]["arguments"] += delta["function"].get("arguments", "")
    return calls


async def chat_completion(request, include_usage: bool):
    from fastapi.responses import JSONResponse, StreamingResponse
    from fastchat.constants import ErrorCode
    from fastchat.serve import openai_api_server as server

    error = await server.check_model(request)
    if error is None:
        error = server.check_requests(request)
    if error is not None:
        return error
    worker_addr = await server.get_worker_address(request.model)
    gen_params = await server.get_gen_params(
        request.model, worker_addr, request.messages, temperature=request.temperature, top_p=request.top_p,
        top_k=request.top_k, presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty, max_tokens=request.max_tokens, echo=False, stop=request.stop)
    max_new_tokens, error = await server.check_length(request, gen_params["prompt"], gen_params["max_new_tokens"],
                                                      worker_addr)
    if error is not None:
        return error
    gen_params["max_new_tokens"] = max_new_tokens
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if request.stream:
        return StreamingResponse(_stream(request.model, gen_params, request.n, worker_addr, completion_id, created,
                                         include_usage), media_type="text/event-stream")
    try:
        results = await asyncio.gather(*(server.generate_completion(gen_params, worker_addr)
                                         for _ in range(request.n)))
    except Exception as exc:
        return server.create_error_response(ErrorCode.INTERNAL_ERROR, str(exc))
    choices = []
    for i, content in enumerate(results):
        if isinstance(content, str):
            content = json.loads(content)
        if content["error_code"] != 0:
            return server.create_error_response(content["error_code"], content["text"])
        choices.append({"index": i, "message": _message(content), "logprobs": None,
                        "finish_reason": content.get("finish_reason") or "stop"})
    return JSONResponse({"id": completion_id, "object": "chat.completion", "created": created,
                         "model": request.model, "choices": choices, "usage": _usage(results)})


async def _stream(model: str, gen_params: dict, n: int, worker_addr: str, completion_id: str, created: int,
                  include_usage: bool):
    from fastchat.serve import openai_api_server as server

    def event(choices: list, **extra) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    finals = []
    for i in range(n):  # FastChat runs the choices one after the other; so does this route
        yield event([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        sent_text, sent_reasoning, sent_calls = "", "", 0
        last = None
        async for content in server.generate_completion_stream(gen_params, worker_addr):
            if content["error_code"] != 0:
                yield f"data: {json.dumps(content, ensure_ascii=False)}\n\n"
                yield "data: [DONE]\n\n"
                return
            last = content
            text = content["text"].replace("\ufffd", "")
            delta = {}
            if len(text) > len(sent_text) and text.startswith(sent_text):
                delta["content"], sent_text = text[len(sent_text):], text
            reasoning = content.get("reasoning_content") or ""
            if len(reasoning) > len(sent_reasoning):
                delta["reasoning_content"], sent_reasoning = reasoning[len(sent_reasoning):], reasoning
            calls = content.get("tool_call_deltas") or []
            if len(calls) > sent_calls:
                delta["tool_calls"], sent_calls = calls[sent_calls:], len(calls)
            finish = content.get("finish_reason")
            if delta or finish:
                yield event([{"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}])
        if last is not None:
            finals.append(last)
    if include_usage and finals:
        yield event([], usage=_usage(finals))
    yield "data: [DONE]\n\n"
