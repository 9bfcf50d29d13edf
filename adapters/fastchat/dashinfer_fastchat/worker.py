"""A FastChat model worker on dashinfer-core, a drop-in peer of `fastchat.serve.vllm_worker`.

    python -m dashinfer_fastchat.worker --model-path default --host 127.0.0.1 --port 21002 \\
        --worker-address http://127.0.0.1:21002 --controller-address http://127.0.0.1:21001

Registration, heartbeats, status and the conversation template come from FastChat's
BaseModelWorker; generation goes through one AsyncEngine, so every request in flight is batched
continuously. The wire protocol is FastChat's: `\\0`-separated JSON chunks with the cumulative
`text`, `error_code`, `usage` and `finish_reason`.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict
from urllib.parse import urlparse

import uvicorn
from fastapi import BackgroundTasks, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastchat.constants import ErrorCode
from fastchat.serve.base_model_worker import BaseModelWorker

from dashinfer_core import (AsyncEngine, EngineConfig, EngineDeadError, InvalidParameterError, LoRARequest,
                            PromptTooLongError, RequestFailedError, SamplingParams)
from dashinfer_core.engine_args import add_engine_args, engine_config_from_args

from .conversation import choose_conversation
from .disconnect import CLIENT_CLOSED_REQUEST, unless_disconnected
from .limits import BodyLimitMiddleware, json_body

app = FastAPI()
app.add_middleware(BodyLimitMiddleware)
worker: "DashInferWorker | None" = None


class DashInferWorker(BaseModelWorker):
    def __init__(self, controller_addr: str, worker_addr: str, worker_id: str, model_path: str,
                 model_names: list[str] | None, limit_worker_concurrency: int, no_register: bool,
                 engine: AsyncEngine, conv_template: str | None = None, loras: list[LoRARequest] = (),
                 embedding_pooling: str = "last"):
        """loras: adapters served under their own names (registered with the controller as models
        of this worker): a request whose `model` is one of them runs with that adapter."""
        self.engine = engine  # make_conv_template (called by the base class) needs the tokenizer
        self.conv_template_given = conv_template is not None
        self.loras = {lora.lora_name: lora for lora in loras}
        default_name = engine.engine.runner.model_dir.name.removesuffix("-v1")
        base_names = model_names or [default_name]
        clash = sorted(set(base_names) & set(self.loras))
        if clash:
            raise SystemExit(f"--lora-modules: {clash[0]!r} is also a base model name")
        super().__init__(controller_addr, worker_addr, worker_id, model_path or default_name,
                         base_names + list(self.loras), limit_worker_concurrency, conv_template)
        self.tokenizer = engine.tokenizer
        self.context_len = engine.engine.max_model_len
        self.draining = False
        self.embedding_pooling = embedding_pooling
        if not no_register:
            # Register once this worker's server accepts connections: registered earlier, the controller
            # hands it requests that fail while uvicorn is still starting (seen: a 500 on the first one).
            threading.Thread(target=self._register_when_listening, args=(worker_addr,), daemon=True,
                             name="register-when-listening").start()

    def _register_when_listening(self, worker_addr: str, timeout: float = 300.0) -> None:
        url = urlparse(worker_addr)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                socket.create_connection((url.hostname, url.port or 80), timeout=1.0).close()
                break
            except OSError:
                time.sleep(0.05)
        self.init_heart_beat()

    def make_conv_template(self, conv_template: str | None = None, model_path: str | None = None):
        return choose_conversation(self.engine.tokenizer, conv_template)

    def encode(self, prompt: str) -> list[int]:
        """Token ids of a prompt FastChat built; its BOS, if the template wrote one, is not doubled."""
        tok = self.tokenizer
        bos = getattr(tok, "bos_token", None)
        with self.engine.engine.tokenizer_lock:
            return tok.encode(prompt, add_special_tokens=not (bos and prompt.startswith(bos)))

    def render_chat(self, params: dict, sampling: SamplingParams):
        """A chat request's ChatPlan and images: the messages as they came (dashinfer_fastchat.openai_api_server
        sends them), rendered by the model's own chat template with the request's tools and
        chat_template_kwargs (FastChat's prompt builder knows neither tools nor images)."""
        from dashinfer_core.chat import plan_chat
        from dashinfer_core.llm import conversation_images
        messages = params["chat_messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise InvalidParameterError("messages", "must be a list of messages")
        images = conversation_images(messages)
        if images and self.engine.engine.images is None:
            raise InvalidParameterError("images", "this model takes text only (the messages carry image_url parts)")
        kwargs = params.get("chat_template_kwargs")
        if kwargs is not None and not isinstance(kwargs, dict):
            raise InvalidParameterError("chat_template_kwargs", "must be an object")
        with self.engine.engine.tokenizer_lock:
            plan = plan_chat(self.tokenizer, messages, sampling, params.get("tools"), params.get("tool_choice"),
                             params.get("parallel_tool_calls"), kwargs)
        return plan, images

    def count_token(self, params):
        return {"count": len(self.encode(params["prompt"])), "error_code": 0}

    def get_status(self):
        status = super().get_status()
        status["call_ct"] = self.call_ct
        status["engine"] = asdict(self.engine.get_stats())
        return status

    # ---- generation ----------------------------------------------------------------------------
    async def generate_stream(self, params: dict, request_id: str, http_request: Request | None = None):
        self.call_ct += 1
        prompt_text = params.get("prompt", "")
        echo = bool(params.get("echo", True))
        try:
            sampling = sampling_params_from_fastchat(params, self.conv.stop_token_ids or ())
            images = plan = parser = None
            if params.get("chat_messages") and model_template_renders(params, self.conv_template_given):
                plan, images = self.render_chat(params, sampling)
                prompt_ids, sampling = plan.prompt_ids, plan.params
            else:  # FastChat's prompt (its conversation template)
                prompt_ids = self.encode(prompt_text) if isinstance(prompt_text, str) else list(prompt_text)
                if params.get("chat_messages"):  # a chat all the same: a reasoning model's thinking comes apart
                    from dashinfer_core.chat import ChatPlan, thinking_template
                    thinks = thinking_template(self.tokenizer)
                    plan = ChatPlan(prompt_ids, sampling, reasoning=thinks,
                                    starts_thinking=thinks and prompt_text.rstrip().endswith("<think>"))
            if plan is not None and (plan.tools is not None or plan.reasoning):
                from dashinfer_core.chat import ChatStreamParser
                parser = ChatStreamParser(plan)
            if not prompt_ids:
                raise InvalidParameterError("prompt", "must not be empty")
            lora = self.loras.get(params.get("model"))  # None: one of the base model's names
            stream = self.engine.generate(prompt_ids, sampling, request_id=request_id, lora_request=lora,
                                          images=images)
            decoded: list[str] = []  # token strings for logprobs, grown incrementally
            # A split chat output (reasoning, tool calls): cumulative content and reasoning, and every
            # tool-call delta so far (the server sends the new ones).
            content, reasoning, call_deltas = "", "", []
            async for out in stream:
                texts = [c.text for c in out.outputs]
                text = " ".join(texts)
                finish_reason = (out.outputs[0].finish_reason if len(out.outputs) == 1
                                 else [c.finish_reason for c in out.outputs])
                if parser is not None:
                    delta = parser.finish(texts[0]) if out.finished else parser.feed(texts[0])
                    content, reasoning = content + delta.content, reasoning + delta.reasoning
                    call_deltas += delta.tool_calls
                    text = content
                    if out.finished and parser.made_calls and finish_reason == "stop":
                        finish_reason = "tool_calls"
                ret = {
                    "text": prompt_text + text if echo else text,
                    "error_code": 0,
                    "usage": {"prompt_tokens": len(out.prompt_token_ids),
                              "completion_tokens": out.num_completion_tokens,
                              "total_tokens": len(out.prompt_token_ids) + out.num_completion_tokens,
                              "cached_tokens": out.num_cached_tokens},
                    "cumulative_logprob": [c.cumulative_logprob for c in out.outputs],
                    "finish_reason": finish_reason,
                }
                if parser is not None:
                    ret["reasoning_content"] = reasoning
                    ret["tool_call_deltas"] = call_deltas
                if sampling.logprobs is not None:
                    ret["logprobs"] = self._fastchat_logprobs(out.outputs[0], decoded)
                if out.finished:  # FastChat's servers expect a last chunk without finish_reason first
                    yield (json.dumps({**ret, "finish_reason": None}) + "\0").encode()
                yield (json.dumps(ret) + "\0").encode()
                if http_request is not None and await http_request.is_disconnected():
                    self.engine.abort(request_id)
                    return
        except PromptTooLongError as exc:
            yield error_chunk(ErrorCode.CONTEXT_OVERFLOW,
                              f"This model's maximum context length is {exc.max_model_len} tokens. However, your "
                              f"messages resulted in {exc.num_prompt_tokens} tokens. Please reduce the length of "
                              f"the messages.")
        except InvalidParameterError as exc:
            yield error_chunk(ErrorCode.PARAM_OUT_OF_RANGE, str(exc))
        except RequestFailedError as exc:
            yield error_chunk(ErrorCode.PARAM_OUT_OF_RANGE if exc.is_client_error else ErrorCode.INTERNAL_ERROR,
                              exc.message)
        except EngineDeadError as exc:
            yield error_chunk(ErrorCode.INTERNAL_ERROR, str(exc))

    async def get_embeddings(self, params: dict) -> dict:
        """FastChat's embedding call: {"input": [texts], "encoding_format"} -> {"embedding": [one per text],
        "token_num"}; pooled by the worker's --embedding-pooling, L2-normalised, batched with generation."""
        from dashinfer_core.pooling import PoolingParams
        self.call_ct += 1
        texts = params.get("input")
        encoding = params.get("encoding_format") or "float"
        try:
            if isinstance(texts, str):
                texts = [texts]
            if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t for t in texts):
                raise InvalidParameterError("input", "must be a non-empty string or a list of them")
            if encoding not in ("float", "base64"):
                raise InvalidParameterError("encoding_format", f"must be float or base64, got {encoding!r}")
            pooling = PoolingParams(self.embedding_pooling)
            lora = self.loras.get(params.get("model"))
            outs = await asyncio.gather(*(self.engine.embed(text, pooling, lora_request=lora) for text in texts))
        except PromptTooLongError as exc:
            return {"text": f"This model's maximum context length is {exc.max_model_len} tokens; an input has "
                            f"{exc.num_prompt_tokens}.", "error_code": int(ErrorCode.CONTEXT_OVERFLOW)}
        except (InvalidParameterError, RequestFailedError) as exc:
            return {"text": str(exc), "error_code": int(ErrorCode.PARAM_OUT_OF_RANGE)}
        except EngineDeadError as exc:
            return {"text": str(exc), "error_code": int(ErrorCode.INTERNAL_ERROR)}
        vectors = [out.embedding for out in outs]
        if encoding == "base64":
            from dashinfer_core.pooling import to_base64
            vectors = [to_base64(v) for v in vectors]
        return {"embedding": vectors, "token_num": sum(len(out.prompt_token_ids) for out in outs), "error_code": 0}

    def _fastchat_logprobs(self, completion, decoded: list[str]) -> dict:
        tok = self.tokenizer
        with self.engine.engine.tokenizer_lock:
            for token_id in completion.token_ids[len(decoded):]:
                decoded.append(tok.decode([token_id]))
            entries = completion.logprobs or []
            top = [{tok.decode([t]): lp for t, lp in entry.items()} for entry in entries]
        offsets, position = [], 0
        for piece in decoded:
            offsets.append(position)
            position += len(piece)
        return {"text_offset": offsets, "tokens": list(decoded),
                "token_logprobs": [entry.get(t) for t, entry in zip(completion.token_ids, entries)],
                "top_logprobs": top}

    async def generate(self, params: dict, request_id: str) -> dict:
        last = b""
        async for chunk in self.generate_stream(params, request_id):
            last = chunk
        return json.loads(last[:-1].decode())


def model_template_renders(params: dict, conv_template_given: bool) -> bool:
    """Whether a chat is rendered by the model's own template rather than FastChat's prompt: always
    without --conv-template (the conversation chosen then renders the same prompt), and with it only for
    what a FastChat conversation cannot hold (tools, tool turns, images, chat_template_kwargs)."""
    if not conv_template_given:
        return True
    if params.get("tool_choice") != "none" and params.get("tools") or \
            params.get("tool_choice") not in (None, "none") or params.get("chat_template_kwargs"):
        return True  # (a tool_choice without tools is rendered too: the request is refused there)
    return any(m.get("role") == "tool" or m.get("tool_calls") or isinstance(m.get("content"), list)
               for m in params["chat_messages"] if isinstance(m, dict))


def error_chunk(code: int, message: str) -> bytes:
    return (json.dumps({"text": message, "error_code": int(code)}) + "\0").encode()


def sampling_params_from_fastchat(params: dict, end_of_turn_ids=()) -> SamplingParams:
    """FastChat's generation parameters (what its OpenAI server and clients post) as SamplingParams.
    `end_of_turn_ids`: the conversation template's stop ids, which FastChat's server adds to every
    request; with `ignore_eos` they are EOS by another name and are dropped too (as vLLM does)."""
    def number(key, default):
        value = params.get(key)
        return default if value is None else value

    top_k = number("top_k", -1)
    kwargs = dict(
        n=int(number("n", 1)),
        max_tokens=number("max_new_tokens", 256),
        temperature=float(number("temperature", 1.0)),
        top_p=float(number("top_p", 1.0)),
        top_k=int(top_k) if isinstance(top_k, (int, float)) and float(top_k).is_integer() else top_k,
        presence_penalty=float(number("presence_penalty", 0.0)),
        frequency_penalty=float(number("frequency_penalty", 0.0)),
        repetition_penalty=float(number("repetition_penalty", 1.0)),
        stop=params.get("stop") or None,
        stop_token_ids=[t for t in (params.get("stop_token_ids") or []) if t is not None
                        and not (params.get("ignore_eos") and t in end_of_turn_ids)],
        seed=params.get("seed"),
        logprobs=params.get("logprobs"),
    )
    if isinstance(kwargs["max_tokens"], float) and kwargs["max_tokens"].is_integer():
        kwargs["max_tokens"] = int(kwargs["max_tokens"])
    for key in ("min_p", "min_tokens", "ignore_eos", "json_schema", "regex", "choice", "json_object"):
        if params.get(key) is not None:
            kwargs[key] = params[key]
    # What FastChat's clients may send that this worker cannot honour: refused, not ignored.
    if params.get("images"):
        raise InvalidParameterError("images", "this worker serves text-only models")
    if params.get("use_beam_search"):
        raise InvalidParameterError("use_beam_search", "beam search is not supported")
    if params.get("best_of") not in (None, 1):
        raise InvalidParameterError("best_of", "best-of sampling is not supported; use n")
    try:
        return SamplingParams.from_response_format(params.get("response_format"), **kwargs)
    except TypeError as exc:  # e.g. response_format json_schema and json_schema both given
        raise InvalidParameterError("response_format", f"conflicts with another guided-decoding field ({exc})") \
            from None


# ---- HTTP API (FastChat's worker protocol) ------------------------------------------------------
async def acquire_slot():
    if worker.semaphore is None:
        worker.semaphore = asyncio.Semaphore(worker.limit_worker_concurrency)
    await worker.semaphore.acquire()


def release_slot():
    worker.semaphore.release()


@app.post("/worker_generate_stream")
async def api_generate_stream(request: Request):
    params = await json_body(request)
    if isinstance(params, JSONResponse):
        return params
    await acquire_slot()
    request_id = uuid.uuid4().hex
    background = BackgroundTasks()
    background.add_task(release_slot)
    background.add_task(worker.engine.abort, request_id)  # no-op once finished; frees a cut stream
    return StreamingResponse(worker.generate_stream(params, request_id, request), background=background)


@app.post("/worker_generate")
async def api_generate(request: Request):
    params = await json_body(request)
    if isinstance(params, JSONResponse):
        return params
    await acquire_slot()
    request_id = uuid.uuid4().hex
    try:
        result = await unless_disconnected(request, worker.generate(params, request_id))
        return JSONResponse(result) if result is not None else Response(status_code=CLIENT_CLOSED_REQUEST)
    finally:
        release_slot()
        worker.engine.abort(request_id)


@app.post("/worker_get_embeddings")
async def api_get_embeddings(request: Request):
    params = await json_body(request)
    if isinstance(params, JSONResponse):
        return params
    await acquire_slot()
    try:
        return JSONResponse(await worker.get_embeddings(params))
    finally:
        release_slot()


@app.get("/metrics")
async def api_metrics():
    """Prometheus metrics of this worker's engine (dashinfer_core.metrics)."""
    body, content_type = worker.metrics.exposition()
    return Response(body, media_type=content_type)


@app.post("/worker_get_status")
async def api_get_status(request: Request):
    return worker.get_status()


@app.post("/count_token")
async def api_count_token(request: Request):
    params = await json_body(request)
    if isinstance(params, JSONResponse):
        return params
    return worker.count_token(params)


@app.post("/worker_get_conv_template")
async def api_get_conv(request: Request):
    return worker.get_conv_template()


@app.post("/model_details")
async def api_model_details(request: Request):
    return {"context_length": worker.context_len}


@app.get("/worker_get_engine_stats")
async def api_engine_stats():
    return asdict(worker.engine.get_stats())


def add_worker_engine_args(parser: argparse.ArgumentParser) -> None:
    """Every EngineConfig option as a flag (generated from its fields), the model as --model-path
    (FastChat's name), and FastChat's --tensor-parallel-size."""
    group = add_engine_args(parser, skip=("model",), title="dashinfer-core engine")
    group.add_argument("--num-gpus", type=int, default=None,
                       help="FastChat's name for the tensor-parallel size (as its vllm_worker maps it)")


def parse_lora_modules(items: list[str] | None) -> list[LoRARequest]:
    """vLLM's --lora-modules: name=path entries; ids are given in order from 1."""
    loras = []
    for i, item in enumerate(items or []):
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SystemExit(f"--lora-modules: expected name=path, got {item!r}")
        if any(lora.lora_name == name for lora in loras):
            raise SystemExit(f"--lora-modules: {name!r} is given twice")
        loras.append(LoRARequest(name, i + 1, path))
    return loras


def worker_engine_config(args) -> EngineConfig:
    model = None if args.model_path in (None, "", "default") else args.model_path
    overrides = {"model": model}
    if getattr(args, "lora_modules", None):  # adapters to serve imply LoRA on
        overrides["enable_lora"] = True
    if args.num_gpus is not None:
        if args.tensor_parallel_size not in (1, args.num_gpus):
            raise SystemExit(f"--num-gpus {args.num_gpus} and --tensor-parallel-size {args.tensor_parallel_size} "
                             "disagree")
        overrides["tensor_parallel_size"] = args.num_gpus
    return engine_config_from_args(args, **overrides)


def exit_when_engine_dies(engine: AsyncEngine) -> None:
    """A dead engine (e.g. a tensor-parallel rank crashed) cannot serve: exit non-zero so the
    controller stops routing here (its heartbeat check drops the worker) and a supervisor restarts it."""
    def watch():
        engine.join()
        if engine.dead_reason is not None:
            print(f"dashinfer worker: the engine died ({engine.dead_reason}); exiting", file=sys.stderr, flush=True)
            os._exit(1)
    threading.Thread(target=watch, name="dashinfer-engine-watch", daemon=True).start()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=21002)
    parser.add_argument("--worker-address", default="http://127.0.0.1:21002")
    parser.add_argument("--controller-address", default="http://127.0.0.1:21001")
    parser.add_argument("--model-path", default="default", help="HF model directory, or 'default' (SmolLM2)")
    parser.add_argument("--model-names", type=lambda s: s.split(","), default=None)
    parser.add_argument("--limit-worker-concurrency", type=int, default=1024)
    parser.add_argument("--no-register", action="store_true")
    parser.add_argument("--conv-template", default=None)
    parser.add_argument("--embedding-pooling", choices=("last", "mean"), default="last",
                        help="how /v1/embeddings pools the final hidden states (L2-normalised)")
    parser.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                        help="PEFT LoRA adapters to serve, each registered with the controller under NAME")
    add_worker_engine_args(parser)
    return parser


def main(argv=None) -> None:
    global worker
    args = build_parser().parse_args(argv)
    loras = parse_lora_modules(args.lora_modules)
    engine = AsyncEngine(worker_engine_config(args))
    exit_when_engine_dies(engine)
    for lora in loras:  # read and checked now: a bad adapter stops the worker before it registers
        try:
            asyncio.run(engine.add_lora(lora))
        except InvalidParameterError as exc:
            engine.shutdown()
            raise SystemExit(f"--lora-modules {lora.lora_name}: {exc}") from None
    worker = DashInferWorker(args.controller_address, args.worker_address, uuid.uuid4().hex[:8], args.model_path,
                             args.model_names, args.limit_worker_concurrency, args.no_register, engine,
                             args.conv_template, loras, args.embedding_pooling)
    from dashinfer_core.metrics import Metrics
    worker.metrics = Metrics()
    worker.metrics.attach(engine, worker.model_names[0])
    # Ctrl-C and SIGTERM: uvicorn stops accepting, lets in-flight responses finish (bounded), then
    # the engine stops.
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=os.environ.get("DASHINFER_LOG_LEVEL", "warning"),
                    timeout_graceful_shutdown=30)
    finally:
        engine.shutdown()


if __name__ == "__main__":
    main()
