"""Pick the FastChat conversation template that renders exactly what the model's own chat template
renders, so prompts built by FastChat's OpenAI server match `tokenizer.apply_chat_template`."""
from __future__ import annotations

import logging

from fastchat.conversation import Conversation, SeparatorStyle, get_conv_template

logger = logging.getLogger(__name__)

PROBES = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}],
]
FASTCHAT_CANDIDATES = ("llama-3", "qwen-7b-chat", "chatml", "mistral", "llama-2", "zephyr", "gemma")


def render_with_conversation(conv: Conversation, messages: list[dict]) -> str:
    """What FastChat's OpenAI server sends for `messages` (same steps as its get_gen_params)."""
    conv = conv.copy()
    for message in messages:
        if message["role"] == "system":
            conv.set_system_message(message["content"])
        else:
            conv.append_message(conv.roles[0 if message["role"] == "user" else 1], message["content"])
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


def render_with_tokenizer(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def chatml_from_tokenizer(tokenizer) -> Conversation | None:
    """A ChatML Conversation with the template's default system message and stop ids."""
    text = render_with_tokenizer(tokenizer, [{"role": "user", "content": "x"}])
    if "<|im_start|>" not in text:
        return None
    header = "<|im_start|>system\n"
    system = text[len(header):text.index("<|im_end|>")] if text.startswith(header) else ""
    stop_ids = [i for i in (tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id)
                if isinstance(i, int) and i >= 0 and i != tokenizer.unk_token_id]
    return Conversation(name="dashinfer-chatml", system_template=header + "{system_message}", system_message=system,
                        roles=("<|im_start|>user", "<|im_start|>assistant"), sep_style=SeparatorStyle.CHATML,
                        sep="<|im_end|>", stop_token_ids=list(dict.fromkeys(stop_ids)))


def matches(conv: Conversation, tokenizer) -> bool:
    try:
        return all(render_with_conversation(conv, m) == render_with_tokenizer(tokenizer, m) for m in PROBES)
    except Exception:  # a template that rejects a probe (e.g. no system role) does not match
        return False


def choose_conversation(tokenizer, override: str | None = None) -> Conversation:
    if override:
        return get_conv_template(override)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        logger.warning("the tokenizer has no chat template; using FastChat's 'raw' template")
        return get_conv_template("raw")
    candidates = [c for c in [chatml_from_tokenizer(tokenizer)] if c is not None]
    for name in FASTCHAT_CANDIDATES:
        try:
            candidates.append(get_conv_template(name))
        except KeyError:
            continue
    for conv in candidates:
        if matches(conv, tokenizer):
            if not conv.stop_token_ids and tokenizer.eos_token_id is not None:
                conv.stop_token_ids = [tokenizer.eos_token_id]
            return conv
    fallback = candidates[0] if candidates else get_conv_template("raw")
    logger.warning("no FastChat template renders this model's chat template exactly; using %r "
                   "(pass --conv-template to choose)", fallback.name)
    return fallback
