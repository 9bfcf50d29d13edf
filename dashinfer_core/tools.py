"""Tool (function) calling: OpenAI's `tools` / `tool_choice` checked, turned into the chat template's
`tools` and, where the choice forces a call, into a guided-decoding schema; the model's output parsed
back into tool calls, whole or as a stream.

- `required`: the output is constrained to a JSON array of calls, each one of the tools' schemas
  (`{"name": ..., "arguments": {...}}`), so it always parses and validates; one call only when
  `parallel_tool_calls` is false.
- a named function: the output is that function's arguments object, constrained to its schema.
- `auto`: free text, parsed in the model's own call format, picked from its chat template: Qwen and
  Hermes `<tool_call>{...}</tool_call>`, Mistral `[TOOL_CALLS][...]`, Llama 3.x bare JSON
  `{"name": ..., "parameters": {...}}`. A template that knows no tools gets the tools described in a
  system message in the Hermes format, which is then parsed.
- `none`: the tools are not shown to the model; it answers in text.
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

from .errors import InvalidParameterError

HERMES, MISTRAL, LLAMA3 = "hermes", "mistral", "llama3_json"
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
MISTRAL_OPEN = "[TOOL_CALLS]"
LLAMA3_OPEN = "<|python_tag|>"
MAX_TOOLS = 128


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # a JSON schema of the arguments object


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self, index: int | None = None) -> dict:
        call = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return call if index is None else {"index": index, **call}


@dataclass(frozen=True)
class ToolRequest:
    """A request's checked tools and choice. choice: 'auto', 'required' or 'named' ('none' gives no
    ToolRequest); named: the function a 'named' choice forces."""
    tools: tuple[Tool, ...]
    choice: str
    named: str | None = None
    parallel: bool = True
    format: str = HERMES
    template_knows_tools: bool = True

    def guided_schema(self) -> dict | None:
        """The JSON schema the output is held to (None for auto)."""
        if self.choice == "named":
            return next(t.parameters for t in self.tools if t.name == self.named)
        if self.choice == "required":
            calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                      "required": ["name", "arguments"]} for t in self.tools]
            array = {"type": "array", "minItems": 1, "items": calls[0] if len(calls) == 1 else {"anyOf": calls}}
            if not self.parallel:
                array["maxItems"] = 1
            return array
        return None

    def triggered_spec(self):
        """auto: once the output opens a call, the call is held to the tools' schemas until it closes.
        Hermes: `<tool_call>` then one call and `</tool_call>`; Mistral: `[TOOL_CALLS]` then an array of
        calls. None for Llama 3's bare JSON (nothing opens it: the parser takes the output at the end)."""
        if self.choice != "auto" or self.format not in (HERMES, MISTRAL):
            return None
        from .guided.spec import TriggeredSpec, build_spec, escape_literal
        calls = [{"type": "object", "properties": {"name": {"const": t.name}, "arguments": t.parameters},
                  "required": ["name", "arguments"]} for t in self.tools]
        one = calls[0] if len(calls) == 1 else {"anyOf": calls}
        if self.format == MISTRAL:
            array = {"type": "array", "minItems": 1, "items": one, **({} if self.parallel else {"maxItems": 1})}
            return TriggeredSpec(MISTRAL_OPEN, rf"( )?{build_spec(json_schema=array).regex}")
        call = build_spec(json_schema=one).regex
        return TriggeredSpec(HERMES_OPEN, rf"(\n)?{call}(\n)?{escape_literal(HERMES_CLOSE)}")

    def template_tools(self) -> list[dict]:
        """The tools as chat templates take them (OpenAI's shape)."""
        return [{"type": "function", "function": {"name": t.name, "description": t.description,
                                                  "parameters": t.parameters}} for t in self.tools]

    def system_prompt(self) -> str:
        """For a template that shows no tools: the tools and the Hermes call format, in words."""
        listed = "\n".join(json.dumps(t) for t in self.template_tools())
        return ("You can call functions. The functions, as JSON schemas:\n<tools>\n" + listed + "\n</tools>\n"
                "To call one, answer with a JSON object of its name and arguments inside tags:\n"
                '<tool_call>\n{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>')


def _check_schema(schema: dict) -> None:
    """Against the JSON Schema metaschema (bad types, patterns that are not regular expressions): outlines
    would only fail on some of these when the pattern is compiled, after the request was accepted."""
    import jsonschema
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(p) for p in exc.path)
        raise InvalidParameterError("parameters", f"is not a valid JSON schema{' at ' + where if where else ''}: "
                                                  f"{exc.message}") from None


def template_call_format(template: str | None) -> tuple[str, bool]:
    """(the call format a chat template teaches, whether it renders `tools` at all)."""
    text = template or ""
    knows_tools = "tools" in text
    if MISTRAL_OPEN in text:
        return MISTRAL, knows_tools
    if HERMES_OPEN in text:
        return HERMES, knows_tools
    if knows_tools and (LLAMA3_OPEN in text or '"parameters"' in text or "'parameters'" in text):
        return LLAMA3, knows_tools
    return HERMES, knows_tools


def parse_tool_request(tools, tool_choice=None, parallel_tool_calls=None, chat_template: str | None = None
                       ) -> ToolRequest | None:
    """Check OpenAI's tools / tool_choice / parallel_tool_calls; None when no tool can be called (no
    tools, or tool_choice 'none'). Errors name the field: tools[2].function.parameters, tool_choice."""
    if tools is None or tools == []:
        if tool_choice not in (None, "none", "auto"):
            raise InvalidParameterError("tool_choice", "needs tools")
        return None
    if not isinstance(tools, list):
        raise InvalidParameterError("tools", "must be a list of {type: function, function: {...}}")
    if len(tools) > MAX_TOOLS:
        raise InvalidParameterError("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    from .guided.spec import build_spec
    checked, names = [], set()
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidParameterError(f"{where}.type", "must be 'function'")
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise InvalidParameterError(f"{where}.function", "must be an object with a name")
        name = fn.get("name")
        if not isinstance(name, str) or not name or len(name) > 64 or \
                not all(c.isalnum() or c in "_-" for c in name):
            raise InvalidParameterError(f"{where}.function.name",
                                        f"must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise InvalidParameterError(f"{where}.function.name", f"{name!r} is given twice")
        names.add(name)
        description = fn.get("description") or ""
        if not isinstance(description, str):
            raise InvalidParameterError(f"{where}.function.description", "must be a string")
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, dict):
            raise InvalidParameterError(f"{where}.function.parameters", "must be a JSON schema object")
        try:
            _check_schema(parameters)
            build_spec(json_schema=parameters)
        except InvalidParameterError as exc:
            message = str(exc).split(": ", 1)[-1]
            raise InvalidParameterError(f"{where}.function.parameters", message) from None
        checked.append(Tool(name, description, parameters))
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise InvalidParameterError("parallel_tool_calls", "must be true or false")
    fmt, knows = template_call_format(chat_template)
    base = dict(tools=tuple(checked), parallel=parallel_tool_calls is not False, format=fmt,
                template_knows_tools=knows)
    if tool_choice in (None, "auto"):
        return ToolRequest(choice="auto", **base)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolRequest(choice="required", **base)
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if tool_choice.get("type", "function") != "function" or not isinstance(name, str):
            raise InvalidParameterError("tool_choice", "must be 'none', 'auto', 'required' or "
                                                       "{type: function, function: {name: ...}}")
        if name not in names:
            raise InvalidParameterError("tool_choice.function.name", f"{name!r} is not one of the tools "
                                                                     f"({sorted(names)})")
        return ToolRequest(choice="named", named=name, **base)
    raise InvalidParameterError("tool_choice", f"must be 'none', 'auto', 'required' or a named function, "
                                               f"got {tool_choice!r}")


def check_tool_messages(messages: list) -> None:
    """Assistant tool_calls and tool results in the conversation: shaped as OpenAI sends them (the chat
    template renders them; arguments given as JSON text are parsed for it)."""
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if calls is not None:
            if message.get("role") != "assistant" or not isinstance(calls, list):
                raise InvalidParameterError(f"messages[{i}].tool_calls", "must be a list on an assistant message")
            for j, call in enumerate(calls):
                fn = call.get("function") if isinstance(call, dict) else None
                if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
                    raise InvalidParameterError(f"messages[{i}].tool_calls[{j}].function", "needs a name")
                if isinstance(fn.get("arguments"), str):
                    try:
                        json.loads(fn["arguments"] or "{}")
                    except json.JSONDecodeError:
                        raise InvalidParameterError(f"messages[{i}].tool_calls[{j}].function.arguments",
                                                    "is not JSON text") from None
        if message.get("role") == "tool" and not isinstance(message.get("content"), (str, list)):
            raise InvalidParameterError(f"messages[{i}].content", "a tool message needs its result as content")


def template_messages(messages: list) -> list:
    """Messages for the chat template: tool-call arguments as objects (what Qwen's, Llama's and Mistral's
    templates expect; OpenAI sends them as JSON text), and content given as OpenAI's text parts as one string
    (joined by newlines, as vLLM does: most templates concatenate the content as a string; a list with image
    parts stays a list, for the vision-language templates that walk it)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(part, dict) and part.get("type") == "text"
                                             for part in content):
            message = {**message, "content": "\n".join(str(part.get("text", "")) for part in content)}
        calls = message.get("tool_calls")
        if calls:
            message = {**message, "tool_calls": [
                {**c, "function": {**c["function"], "arguments": _as_object(c["function"].get("arguments"))}}
                for c in calls]}
        out.append(message)
    return out


def _as_object(arguments):
    if isinstance(arguments, str):
        return json.loads(arguments or "{}")
    return arguments or {}


# ---- parsing the output ------------------------------------------------------------------------
def _call_from(obj, arguments_key: str = "arguments") -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get(arguments_key, obj.get("arguments", obj.get("parameters", {})))
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


def _decode_values(text: str, pos: int = 0, end: str = "") -> tuple[list, bool]:
    """(the JSON values from text[pos:] separated by whitespace, ',' or ';', whether all of the rest parsed);
    a character of `end` stops the scan as if the text ended there."""
    decoder, values = json.JSONDecoder(), []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n,;":
            pos += 1
        if pos >= len(text) or text[pos] in end:
            return values, True
        try:
            value, pos = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return values, False
        values.append(value)


def _json_values(text: str) -> list | None:
    """The JSON values in text separated by whitespace, ',' or ';' (None if any part is not JSON)."""
    values, whole = _decode_values(text)
    return values if whole else None


@dataclass
class ParsedOutput:
    content: str | None
    tool_calls: list[ToolCall]


def parse_output(request: ToolRequest, text: str) -> ParsedOutput:
    """The content and tool calls of a finished output. A call that does not parse (an output cut by
    max_tokens, or free text in auto mode) leaves the text as content."""
    if request.choice == "named":
        try:
            json.loads(text)
        except json.JSONDecodeError:
            return ParsedOutput(text, [])
        return ParsedOutput(None, [ToolCall(request.named, text)])
    if request.choice == "required":
        values = _json_values(text)
        calls = [_call_from(v) for v in (values[0] if values and isinstance(values[0], list) else [])]
        if not calls or None in calls:
            return ParsedOutput(text, [])
        return ParsedOutput(None, calls)
    names = {t.name for t in request.tools}
    if request.format == HERMES:
        content, calls, rest = [], [], text
        while HERMES_OPEN in rest:
            before, _, after = rest.partition(HERMES_OPEN)
            body, closed, rest = after.partition(HERMES_CLOSE)
            values = _json_values(body)
            call = _call_from(values[0]) if values and len(values) == 1 else None
            if call is None or call.name not in names:
                return ParsedOutput(text, [])
            content.append(before)
            calls.append(call)
            if not closed:
                break
        content.append(rest if calls else "")
        joined = "".join(content).strip() if calls else text
        return ParsedOutput(joined or None, calls) if calls else ParsedOutput(text, [])
    if request.format == MISTRAL:
        before, found, after = text.partition(MISTRAL_OPEN)
        values = _json_values(after) if found else None
        items = values[0] if values and len(values) == 1 and isinstance(values[0], list) else values
        calls = [_call_from(v) for v in items or []]
        if not found or not calls or None in calls or any(c.name not in names for c in calls):
            return ParsedOutput(text, [])
        return ParsedOutput(before.strip() or None, calls)
    body = text.strip().removeprefix(LLAMA3_OPEN)  # llama3_json: the whole answer is the call(s)
    values = _json_values(body) if body.startswith("{") else None
    calls = [_call_from(v, "parameters") for v in values or []]
    if not calls or None in calls or any(c.name not in names for c in calls):
        return ParsedOutput(text, [])
    return ParsedOutput(None, calls)


class ToolStreamParser:
    """Splits a streamed output into content deltas and tool-call deltas (OpenAI's shape: the first
    delta of a call carries its index, id, type and name, later ones pieces of its arguments).
    feed(cumulative text) -> (content delta, tool-call deltas); finish(text) flushes the rest. The calls
    reassemble to what parse_output gives for the final text."""

    def __init__(self, request: ToolRequest):
        self.request = request
        self.content_sent = 0  # chars of content already sent
        self.calls_sent: list[ToolCall] = []
        self.named_call: ToolCall | None = None
        self.named_args_sent = 0

    def _marker(self) -> str | None:
        return {HERMES: HERMES_OPEN, MISTRAL: MISTRAL_OPEN}.get(self.request.format)

    def feed(self, text: str) -> tuple[str, list[dict]]:
        req = self.request
        if req.choice == "named":  # the whole output is the arguments: stream them as they come
            deltas = []
            if self.named_call is None:
                self.named_call = ToolCall(req.named, "")
                deltas.append({"index": 0, "id": self.named_call.id, "type": "function",
                               "function": {"name": req.named, "arguments": ""}})
            if len(text) > self.named_args_sent:
                deltas.append({"index": 0, "function": {"arguments": text[self.named_args_sent:]}})
                self.named_args_sent = len(text)
            return "", deltas
        if req.choice == "required":
            values = _complete_array_items(text)
            return "", self._new_calls([_call_from(v) for v in values])
        # auto: content until a call may begin; whole calls as they close
        if req.format == LLAMA3:
            if text.lstrip().startswith(("{", LLAMA3_OPEN)) or not text.strip():
                return "", []  # (maybe) a call: decided at the end
            return self._content(text, len(text)), []
        marker = self._marker()
        start = text.find(marker)
        if start < 0:
            safe = len(text)
            for k in range(min(len(marker) - 1, len(text)), 0, -1):  # a marker may be starting
                if text.endswith(marker[:k]):
                    safe = len(text) - k
                    break
            return self._content(text, len(text[:safe].rstrip()) if safe < len(text) else safe), []
        content = self._content(text, len(text[:start].rstrip()))
        if req.format == HERMES:
            done = []
            for block in text[start:].split(HERMES_OPEN)[1:]:
                body, closed, _ = block.partition(HERMES_CLOSE)
                if closed:
                    values = _json_values(body)
                    done.append(_call_from(values[0]) if values and len(values) == 1 else None)
            return content, self._new_calls(done)
        return content, []  # mistral: the calls come whole at the end

    def _content(self, text: str, upto: int) -> str:
        if upto <= self.content_sent:
            return ""
        delta = text[self.content_sent:upto]
        self.content_sent = upto
        return delta

    def _new_calls(self, calls: list) -> list[dict]:
        names = {t.name for t in self.request.tools}
        deltas = []
        for call in calls[len(self.calls_sent):]:
            if call is None or call.name not in names:
                break
            index = len(self.calls_sent)
            self.calls_sent.append(call)
            deltas.append(call.to_openai(index))
        return deltas

    def finish(self, text: str) -> tuple[str, list[dict], bool]:
        """The rest once the output is final: (content delta, tool-call deltas, whether any call was made)."""
        parsed = parse_output(self.request, text)
        if self.request.choice == "named":
            content, deltas = self.feed(text) if parsed.tool_calls else ("", [])
            return content, deltas, bool(parsed.tool_calls)
        if not parsed.tool_calls:  # nothing parsed as calls: whatever was held back is content
            return self._content(text, len(text)), [], bool(self.calls_sent)
        if parsed.content and not self.calls_sent and self.content_sent == 0 and self.request.format == LLAMA3:
            return self._content(parsed.content, len(parsed.content)), [], True
        content = ""
        if self.request.format == HERMES and self.request.choice == "auto":  # text after the last call (required:
            # the whole output is the array of calls)
            tail = text.rpartition(HERMES_CLOSE)[2].strip()
            content = tail
        return content, self._new_calls(parsed.tool_calls), True


def _complete_array_items(text: str) -> list:
    """The complete items so far of a JSON array being written (for `required` streams)."""
    start = text.find("[")
    return [] if start < 0 else _decode_values(text, start + 1, end="]")[0]
