"""Which OpenAI request fields the FastChat stack honours, and how those FastChat's own server does
not know reach the worker.

FastChat's OpenAI server parses a request into its own model and builds the worker payload from a
fixed list of fields; anything else in the body would be dropped without a word. `check_request`
reads the raw body first: a field the stack honours passes (the ones FastChat does not forward come
back as extra worker parameters), a field it cannot honour raises `FieldError` naming it, so the
server answers 400 instead of ignoring it.
"""
from __future__ import annotations

# Read and honoured by FastChat's own server (request model -> worker payload).
FASTCHAT_FIELDS = {"model", "temperature", "top_p", "top_k", "n", "max_tokens", "stop", "stream",
                   "presence_penalty", "frequency_penalty", "user"}
CHAT_FIELDS = FASTCHAT_FIELDS | {"messages"}
# Chat only: the worker renders the messages with the model's own template, tools included, and splits
# the output into reasoning, content and tool calls; the server streams usage when asked.
CHAT_WORKER_FIELDS = ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs")
COMPLETION_FIELDS = FASTCHAT_FIELDS | {"prompt", "logprobs", "echo"}
# Forwarded to the worker as they are; its SamplingParams honours them.
WORKER_FIELDS = ("seed", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "response_format")
# Guided decoding: our names (the LiteLLM provider's), vLLM's names, and vLLM's structured_outputs keys.
GUIDED_NAMES = {"json_schema": "json_schema", "guided_json": "json_schema",
                "regex": "regex", "guided_regex": "regex",
                "choice": "choice", "guided_choice": "choice"}
STRUCTURED_OUTPUT_KEYS = {"json": "json_schema", "regex": "regex", "choice": "choice", "json_object": "json_object"}
CHAT_ROLES = {"system", "user", "assistant", "developer", "tool"}  # developer: OpenAI's newer name for system
TEXT_ONLY = "this server runs text-only models"
NO_FUNCTIONS = "the deprecated functions / function_call are not supported; use tools / tool_choice"


class FieldError(ValueError):
    """A request field the stack cannot honour; `param` names it (OpenAI's error `param`)."""

    def __init__(self, param: str, message: str):
        self.param = param
        super().__init__(f"{param}: {message}")


def _harmless(name: str, value, body: dict) -> bool:
    """Fields the stack does not act on but whose value asks for nothing beyond its behaviour."""
    if name == "functions":
        return value == []
    if name == "function_call":
        return value == "none"
    if name == "store":
        return value is False
    if name == "metadata":
        return isinstance(value, dict)  # tags for stored completions; nothing is stored
    if name == "service_tier":
        return value in ("auto", "default")
    if name == "modalities":
        return value == ["text"]
    if name == "best_of":
        return value == 1
    if name == "use_beam_search":
        return value is False
    if name == "suffix":
        return value == ""
    return False


def _unsupported(name: str, value) -> str:
    if name in ("tools", "tool_choice", "parallel_tool_calls", "chat_template_kwargs", "stream_options"):
        return "only on /v1/chat/completions" if name != "stream_options" else "takes only include_usage"
    if name in ("functions", "function_call"):
        return NO_FUNCTIONS
    if name == "logprobs":
        return "not supported on chat completions by this server (it is on /v1/completions)"
    if name == "top_logprobs":
        return "not supported on chat completions by this server (logprobs is on /v1/completions)"
    if name == "logit_bias":
        return "not supported by the engine yet"
    if name in ("best_of", "use_beam_search"):
        return "best-of and beam search are not supported; use n for several samples"
    if name == "suffix":
        return "insertion (suffix) is not supported"
    if name == "store":
        return "completions are not stored by this server"
    if name in ("modalities", "audio"):
        return TEXT_ONLY + " (text output only)"
    if name in ("guided_grammar", "guided_decoding_backend", "guided_whitespace_pattern"):
        return "not supported; guided decoding takes json_schema, regex or choice (or vLLM's guided_json, " \
               "guided_regex, guided_choice)"
    return "not a field this server understands or honours"


def guided_fields(body: dict) -> dict:
    """The guided-decoding request as worker parameters (json_schema / regex / choice / json_object /
    response_format); at most one per request."""
    found: dict[str, tuple[str, object]] = {}  # canonical -> (field as named in the request, value)

    def add(canonical: str, named: str, value) -> None:
        if found:
            first = next(iter(found.values()))[0]
            raise FieldError(named, f"at most one guided-decoding field per request (already given: {first})")
        found[canonical] = (named, value)

    response_format = body.get("response_format")
    if response_format is not None:
        if not isinstance(response_format, dict):
            raise FieldError("response_format", "must be an object with a 'type'")
        if response_format.get("type") not in (None, "text"):
            add("response_format", "response_format", response_format)
    for name, canonical in GUIDED_NAMES.items():
        if body.get(name) is not None:
            add(canonical, name, body[name])
    structured = body.get("structured_outputs")
    if structured is not None:
        if not isinstance(structured, dict):
            raise FieldError("structured_outputs", "must be an object")
        for key, value in structured.items():
            if value is None or value is False:
                continue
            if key not in STRUCTURED_OUTPUT_KEYS:
                raise FieldError(f"structured_outputs.{key}", "not supported; use json, regex, choice or json_object")
            add(STRUCTURED_OUTPUT_KEYS[key], f"structured_outputs.{key}", value)
    return {canonical: value for canonical, (_, value) in found.items()}


def check_messages(messages) -> list | None:
    """The chat messages for the worker (which renders them with the model's own chat template: tool
    calls, tool results and images included), `developer` as `system`; None when FastChat's request
    model will say what is wrong with them (no messages at all)."""
    if messages is None:
        return None
    if not isinstance(messages, list) or not messages:  # (FastChat's model takes a string: a prompt, not a chat)
        raise FieldError("messages", "must be a non-empty list of messages")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return None
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise FieldError(f"messages[{i}].role", f"must be one of system, user, assistant, developer, tool, got "
                                                     f"{role!r}" + (f" ({NO_FUNCTIONS})" if role == "function"
                                                                    else ""))
        for key, value in message.items():
            if key in ("role", "content") or value is None:
                continue
            if key == "tool_calls" and role == "assistant" or key in ("tool_call_id", "name") and role == "tool":
                continue
            raise FieldError(f"messages[{i}].{key}",
                             NO_FUNCTIONS if key == "function_call"
                             else f"not used on a {role} message here (role and content"
                                  + (", tool_calls" if role == "assistant" else ", tool_call_id, name" if role == "tool"
                                     else "") + ")")
        content = message.get("content")
        if role == "developer":
            message = {**message, "role": "system"}
        if isinstance(content, list):
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "image_url":
                    url = part.get("image_url")
                    if not isinstance(url.get("url") if isinstance(url, dict) else url, str):
                        raise FieldError(f"messages[{i}].content[{j}]", "image_url must be {\"url\": \"data:...\"}")
                elif kind != "text":
                    raise FieldError(f"messages[{i}].content[{j}]", f"only text and image_url parts are supported, "
                                                                    f"got type {kind!r}")
        elif content is None:
            if not (role == "assistant" and message.get("tool_calls")):
                raise FieldError(f"messages[{i}].content", "must be a string or a list of text parts")
            message = {**message, "content": ""}
        elif not isinstance(content, str):
            raise FieldError(f"messages[{i}].content", "must be a string or a list of text parts")
        out.append(message)
    return out


def for_fastchat(messages: list) -> list:
    """The messages as FastChat's own request model and prompt builder take them (its length check
    and template): text parts joined, tool turns as plain text."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            content = "\n".join(part.get("text", "") for part in content if part.get("type") == "text")
        role = message["role"] if message["role"] in ("system", "user", "assistant") else "user"
        out.append({"role": role, "content": content or ""})
    return out


def check_request(body: dict, chat: bool) -> tuple[dict, dict]:
    """(extra worker parameters, changes to FastChat's parsed request) for a raw request body;
    raises FieldError for the first field the stack cannot honour."""
    known = CHAT_FIELDS if chat else COMPLETION_FIELDS
    extras: dict = {}
    changes: dict = {}
    for name, value in body.items():
        if value is None or name in known or name in WORKER_FIELDS or name in GUIDED_NAMES:
            continue
        if name in ("structured_outputs", "max_completion_tokens"):
            continue
        if chat and name in CHAT_WORKER_FIELDS:
            continue
        if name == "stream_options" and not body.get("stream"):
            raise FieldError(name, "only with stream: true")
        if name == "stream_options" and isinstance(value, dict) and set(value) <= {"include_usage"} and \
                (chat or not value.get("include_usage")):
            continue
        if chat and name == "logprobs" and value is False:
            continue
        if _harmless(name, value, body):
            continue
        raise FieldError(name, _unsupported(name, value) if not (name == "stream_options" and not chat)
                         else "include_usage is only served on /v1/chat/completions here")
    stop = body.get("stop")
    if stop == "" or (isinstance(stop, list) and "" in stop):  # (FastChat's server would drop a plain "")
        raise FieldError("stop", "each stop string must be a non-empty string of at most 512 characters")
    if not chat:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and prompt and not all(isinstance(p, str) for p in prompt):
            raise FieldError("prompt", "token-id prompts are not supported here; send text")
    if body.get("max_completion_tokens") is not None:
        if body.get("max_tokens") not in (None, body["max_completion_tokens"]):
            raise FieldError("max_completion_tokens", "conflicts with max_tokens; give one")
        changes["max_tokens"] = body["max_completion_tokens"]
    for name in WORKER_FIELDS:
        if body.get(name) is not None and name != "response_format":
            extras[name] = body[name]
    extras.update(guided_fields(body))
    if extras.get("seed") is not None and (body.get("n") or 1) > 1:
        # FastChat sends the n choices as n identical worker requests: with one seed all would repeat.
        raise FieldError("seed", "cannot be combined with n > 1 on this server (every choice would be the same)")
    if chat:
        for name in CHAT_WORKER_FIELDS:
            if body.get(name) is not None:
                extras[name] = body[name]
        messages = check_messages(body.get("messages"))
        if messages is not None:
            extras["chat_messages"] = messages
            changes["messages"] = for_fastchat(messages)
    return extras, changes


EMBEDDING_FIELDS = {"model", "input", "user", "encoding_format", "engine"}


def check_embeddings_request(body: dict) -> None:
    """/v1/embeddings: text input (FastChat would decode token ids with tiktoken, not the model's
    tokenizer), float or base64 encoding, and no field the worker would not honour (`dimensions`)."""
    for name, value in body.items():
        if value is None or name in EMBEDDING_FIELDS:
            continue
        raise FieldError(name, "the embedding size is the model's hidden size; it cannot be changed"
                         if name == "dimensions" else "not a field this server understands or honours")
    text = body.get("input")
    if isinstance(text, str):
        text = [text]
    if not isinstance(text, list) or not text or not all(isinstance(t, str) and t for t in text):
        raise FieldError("input", "must be a non-empty string or a list of non-empty strings (token ids are not "
                                  "supported here)")
    if body.get("encoding_format") not in (None, "float", "base64"):
        raise FieldError("encoding_format", f"must be float or base64, got {body['encoding_format']!r}")
