"""A chat request as the servers meet it: messages (with tool calls and results), tools, tool_choice and
a reasoning model's thinking, rendered with the model's own chat template; and the output split back
into reasoning, content and tool calls, whole or streamed. Shared by LLM.chat and both adapters.

Reasoning (Qwen3's, DeepSeek-R1's `<think>...</think>`): a template that writes `<think>` is a
reasoning template; the text up to `</think>` is `reasoning_content`, the rest `content` (where tool
calls are then looked for). `enable_thinking` reaches the template through chat_template_kwargs.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .errors import InvalidParameterError
from .sampling_params import SamplingParams
from .tools import MISTRAL, ToolRequest, ToolStreamParser, check_tool_messages, parse_output, \
    parse_tool_request, template_messages

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


@dataclass
class ChatPlan:
    prompt_ids: list[int]
    params: SamplingParams
    tools: ToolRequest | None = None
    reasoning: bool = False  # the template is a thinking one: split <think> ... </think> off
    starts_thinking: bool = False  # the prompt itself opened <think>: the output begins in reasoning


@dataclass
class ChatMessage:
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list = field(default_factory=list)  # tools.ToolCall

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """OpenAI's: 'tool_calls' when the model called tools and was not cut short."""
        return "tool_calls" if self.tool_calls and engine_reason == "stop" else engine_reason


def thinking_template(tokenizer) -> bool:
    """The tokenizer's chat template writes <think>: a reasoning model."""
    template = getattr(tokenizer, "chat_template", None) or ""
    if not isinstance(template, str):
        template = " ".join(template.values())
    return THINK_OPEN in template


def plan_chat(tokenizer, messages: list, params: SamplingParams, tools=None, tool_choice=None,
              parallel_tool_calls=None, chat_template_kwargs: dict | None = None,
              add_generation_prompt: bool = True) -> ChatPlan:
    """Render the conversation (tools included) and hold the output to a forced call's schema.
    Errors name the field (tools[1].function.parameters, tool_choice, messages[3].tool_calls, ...)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise InvalidParameterError("messages", "this model's tokenizer has no chat template")
    if not isinstance(template, str):  # a dict of named templates: the default one
        template = template.get("default") or next(iter(template.values()))
    request = parse_tool_request(tools, tool_choice, parallel_tool_calls, template)
    check_tool_messages(messages)
    kwargs = dict(chat_template_kwargs or {})
    if "tools" in kwargs:
        raise InvalidParameterError("chat_template_kwargs.tools", "give tools as the request's `tools`")
    rendered = template_messages(messages)
    if request is not None:
        if request.template_knows_tools:
            kwargs["tools"] = request.template_tools()
        else:
            rendered = _with_tool_system_prompt(rendered, request.system_prompt())
        schema = request.guided_schema()
        triggered = request.triggered_spec()
        if request.choice == "auto" and request.format == MISTRAL and params.skip_special_tokens:
            params = dataclasses.replace(params, skip_special_tokens=False)  # [TOOL_CALLS] is a control token
        if triggered is not None and params.guided_spec is None:  # a guided request keeps its own pattern
            params = dataclasses.replace(params)
            params.triggered_spec = triggered
        if schema is not None:
            if params.guided_spec is not None:
                raise InvalidParameterError("tool_choice", f"{tool_choice!r} holds the output to the tool's schema; "
                                                           "it cannot be combined with response_format or another "
                                                           "guided-decoding field")
            params = dataclasses.replace(params, json_schema=schema)
    try:
        text = tokenizer.apply_chat_template(rendered, tokenize=False, add_generation_prompt=add_generation_prompt,
                                             **kwargs)
    except InvalidParameterError:
        raise
    except Exception as exc:  # the template rejected the messages
        raise InvalidParameterError("messages", f"the chat template cannot render them: {exc}") from None
    reasoning = THINK_OPEN in template
    ids = tokenizer.encode(text, add_special_tokens=False)  # the template holds any BOS it wants
    return ChatPlan(ids, params, request, reasoning,
                    starts_thinking=reasoning and text.rstrip().endswith(THINK_OPEN))


def _with_tool_system_prompt(messages: list, prompt: str) -> list:
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": messages[0]["content"] + "\n\n" + prompt}, *messages[1:]]
    return [{"role": "system", "content": prompt}, *messages]


def split_reasoning(text: str, starts_thinking: bool = False) -> tuple[str | None, str]:
    """(reasoning, content) of a reasoning model's output."""
    body = text
    if body.lstrip().startswith(THINK_OPEN):
        body = body.lstrip()[len(THINK_OPEN):]
        starts_thinking = True
    if THINK_CLOSE in body:
        reasoning, _, content = body.partition(THINK_CLOSE)
        return reasoning.strip() or None, content.lstrip()
    if starts_thinking:  # cut before the thinking ended
        return body.strip() or None, ""
    return None, text


def parse_chat_output(plan: ChatPlan, text: str) -> ChatMessage:
    reasoning, content = split_reasoning(text, plan.starts_thinking) if plan.reasoning else (None, text)
    if plan.tools is None:
        return ChatMessage(content, reasoning)
    parsed = parse_output(plan.tools, content)
    return ChatMessage(parsed.content, reasoning, parsed.tool_calls)


@dataclass
class ChatDelta:
    reasoning: str = ""
    content: str = ""
    tool_calls: list = field(default_factory=list)  # OpenAI tool-call delta dicts

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.tool_calls)


class ChatStreamParser:
    """One streamed choice: feed() the cumulative text at each step, finish() it once final. The deltas
    concatenate to parse_chat_output's message."""

    def __init__(self, plan: ChatPlan):
        self.plan = plan
        self.tools = ToolStreamParser(plan.tools) if plan.tools is not None else None
        self.reasoning_sent = 0
        self.content_sent = 0  # without tools: chars of content sent (the tool parser counts its own)
        self.made_calls = False

    def _split(self, text: str, final: bool) -> tuple[str, str | None]:
        """(reasoning so far that is safe to send, content so far or None while still thinking)."""
        if not self.plan.reasoning:
            return "", text
        body, thinking = text, self.plan.starts_thinking
        stripped = body.lstrip()
        if not final and THINK_OPEN.startswith(stripped) and not thinking:
            return "", None  # may be opening <think>
        if stripped.startswith(THINK_OPEN):
            body, thinking = stripped[len(THINK_OPEN):], True
        if not thinking:
            return "", text
        reasoning, closed, content = body.partition(THINK_CLOSE)
        if closed:
            return reasoning.strip(), content.lstrip()
        if final:
            return reasoning.strip(), ""
        for k in range(len(THINK_CLOSE) - 1, 0, -1):  # hold back a '</think>' being written
            if reasoning.endswith(THINK_CLOSE[:k]):
                reasoning = reasoning[:-k]
                break
        return reasoning.lstrip().rstrip(), None

    def feed(self, text: str) -> ChatDelta:
        return self._step(text, final=False)

    def finish(self, text: str) -> ChatDelta:
        return self._step(text, final=True)

    def _step(self, text: str, final: bool) -> ChatDelta:
        reasoning, content = self._split(text, final)
        delta = ChatDelta(reasoning=reasoning[self.reasoning_sent:] if len(reasoning) > self.reasoning_sent else "")
        self.reasoning_sent = max(self.reasoning_sent, len(reasoning))
        if content is None:
            return delta
        if self.tools is None:
            delta.content = content[self.content_sent:]
            self.content_sent = max(self.content_sent, len(content))
            return delta
        if final:
            delta.content, delta.tool_calls, self.made_calls = self.tools.finish(content)
        else:
            delta.content, delta.tool_calls = self.tools.feed(content)
        return delta
