"""Tool calls and reasoning in the engine's chat path (dashinfer_core.tools / chat): requests checked with
the field named, prompts from the model's own template, forced calls that always validate, the model's
own call formats parsed whole and streamed, and <think> split off. The server stacks run the same
checks end to end (test_openai_fields.check_tool_calls)."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest
from transformers import AutoTokenizer

from dashinfer_core import LLM, InvalidParameterError, SamplingParams
from dashinfer_core.chat import ChatStreamParser, parse_chat_output, plan_chat, split_reasoning
from dashinfer_core.tools import HERMES, LLAMA3, MISTRAL, ToolStreamParser, parse_output, parse_tool_request
from test_openai_fields import TIME_PARAMS, TOOLS, WEATHER_ASK, WEATHER_PARAMS

SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
# Templates in the style of Qwen2.5's (tools in the system turn, <tool_call> answers, <tool_response>
# results) and Qwen3's (the same, and <think>: enable_thinking=False writes an empty thought).
QWEN_TOOLS_TEMPLATE = (
    "{%- if tools %}<|im_start|>system\n{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}\n\n"
    "{% endif %}# Tools\n<tools>{% for tool in tools %}\n{{ tool | tojson }}{% endfor %}\n</tools>\n"
    "Answer a call as <tool_call>\n{\"name\": <name>, \"arguments\": <args>}\n</tool_call><|im_end|>\n"
    "{%- elif messages[0]['role'] == 'system' %}<|im_start|>system\n{{ messages[0]['content'] }}<|im_end|>\n"
    "{%- endif %}"
    "{%- for message in messages %}{% if message['role'] == 'system' %}{% continue %}{% endif %}"
    "{%- if message['role'] == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message['content'] }}\n"
    "</tool_response><|im_end|>\n"
    "{%- else %}<|im_start|>{{ message['role'] }}\n{{ message['content'] or '' }}"
    "{%- for call in message.get('tool_calls', []) %}<tool_call>\n"
    "{\"name\": \"{{ call['function']['name'] }}\", \"arguments\": {{ call['function']['arguments'] | tojson }}}\n"
    "</tool_call>{% endfor %}<|im_end|>\n{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}<|im_start|>assistant\nTHINKING{% endif %}")
QWEN3_THINKING = "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}"


def template(thinking: bool) -> str:
    return QWEN_TOOLS_TEMPLATE.replace("THINKING", QWEN3_THINKING if thinking else "")


@pytest.fixture(scope="module")
def qwen_dirs(tiny_models, tmp_path_factory):
    """The tiny Qwen2 and Qwen3 with the templates above (the same random weights)."""
    import shutil
    out = {}
    for family, thinking in (("qwen2", False), ("qwen3", True)):
        path = tmp_path_factory.mktemp(f"{family}-tools")
        shutil.copytree(tiny_models[family], path, dirs_exist_ok=True)
        tok = AutoTokenizer.from_pretrained(str(path))
        tok.chat_template = template(thinking)
        tok.save_pretrained(str(path))
        out[family] = path
    return out


@pytest.fixture(scope="module")
def smollm():
    llm = LLM(dtype="float32", max_num_seqs=16)
    yield llm
    llm.shutdown()


# ---- requests ----------------------------------------------------------------------------------
def test_bad_tool_input_names_the_field():
    bad = [(dict(tools="x"), "tools"), (dict(tools=[{"type": "code"}]), "tools[0].type"),
           (dict(tools=[{"type": "function", "function": {"name": "a b"}}]), "tools[0].function.name"),
           (dict(tools=[TOOLS[0], TOOLS[0]]), "tools[1].function.name"),
           (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}]),
            "tools[0].function.parameters"),
           (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {
               "type": "object", "properties": {"x": {"type": "string", "pattern": "("}}}}}]),
            "tools[0].function.parameters"),
           (dict(tools=TOOLS, tool_choice="always"), "tool_choice"),
           (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}),
            "tool_choice.function.name"),
           (dict(tools=None, tool_choice="required"), "tool_choice"),
           (dict(tools=TOOLS, parallel_tool_calls="yes"), "parallel_tool_calls")]
    for kw, field in bad:
        with pytest.raises(InvalidParameterError) as err:
            parse_tool_request(**kw)
        assert err.value.field == field, (kw, str(err.value))
    assert parse_tool_request(None) is None and parse_tool_request(TOOLS, "none") is None
    named = parse_tool_request(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    assert named.guided_schema() == TIME_PARAMS
    required = parse_tool_request(TOOLS, "required", parallel_tool_calls=False)
    assert required.guided_schema()["maxItems"] == 1 and len(required.guided_schema()["items"]["anyOf"]) == 2
    assert parse_tool_request(TOOLS).guided_schema() is None


def test_a_forced_call_cannot_be_combined_with_another_guided_field(smollm):
    with pytest.raises(InvalidParameterError) as err:
        smollm.chat(WEATHER_ASK, SamplingParams(max_tokens=4, json_object=True), tools=TOOLS, tool_choice="required")
    assert err.value.field == "tool_choice"


def test_prompt_comes_from_the_models_template(qwen_dirs):
    tok = AutoTokenizer.from_pretrained(str(qwen_dirs["qwen2"]))
    plan = plan_chat(tok, WEATHER_ASK, SamplingParams(), TOOLS, "auto")
    expected = tok.apply_chat_template(WEATHER_ASK, tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert plan.prompt_ids == tok.encode(expected, add_special_tokens=False) and '"get_time"' in expected
    assert plan.tools.format == HERMES and plan.tools.template_knows_tools and plan.params.guided_spec is None
    # tool_choice none: the tools are not shown
    plain = plan_chat(tok, WEATHER_ASK, SamplingParams(), TOOLS, "none")
    assert plain.tools is None and "get_time" not in tok.decode(plain.prompt_ids)
    # a tool turn: arguments sent as JSON text reach the template as an object
    turns = [*WEATHER_ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": '{"timezone": "CET"}'}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    text = tok.decode(plan_chat(tok, turns, SamplingParams(), TOOLS).prompt_ids)
    assert '{"name": "get_time", "arguments": {"timezone": "CET"}}' in text and "<tool_response>\n12:00" in text
    with pytest.raises(InvalidParameterError) as err:
        plan_chat(tok, [{"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "f", "arguments": "{oops"}}]}], SamplingParams())
    assert err.value.field == "messages[0].tool_calls[0].function.arguments"


def test_a_template_without_tools_gets_them_in_a_system_message(smollm):
    tok = smollm.get_tokenizer()
    plan = plan_chat(tok, WEATHER_ASK, SamplingParams(), TOOLS, "auto")
    text = tok.decode(plan.prompt_ids)
    assert not plan.tools.template_knows_tools and "<tool_call>" in text and '"get_weather"' in text
    assert text.startswith("<|im_start|>system\nYou can call functions")


def test_text_parts_render_as_the_string_they_join(smollm):
    """OpenAI's content parts ([{"type": "text", "text": ...}]), which SmolLM2's template cannot concatenate
    itself: rendered as the newline-joined string, system and user turns alike."""
    tok = smollm.get_tokenizer()
    parts = [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "Say hi"}, {"type": "text", "text": "twice."}]}]
    joined = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi\ntwice."}]
    assert plan_chat(tok, parts, SamplingParams()).prompt_ids == plan_chat(tok, joined, SamplingParams()).prompt_ids
    params = SamplingParams(max_tokens=6, temperature=0.0)
    assert smollm.chat([parts], params)[0].text == smollm.chat([joined], params)[0].text


# ---- forced calls through the engine ------------------------------------------------------------
def test_forced_calls_always_validate(smollm):
    """20 sampled calls, required (one call each) or named: every one parses and validates."""
    choices = ["required", {"type": "function", "function": {"name": "get_weather"}},
               {"type": "function", "function": {"name": "get_time"}}]
    for c, choice in enumerate(choices):
        count = 8 if c == 0 else 6
        outs = smollm.chat([WEATHER_ASK] * count, [SamplingParams(max_tokens=160, temperature=1.0, seed=100 * c + i)
                                                   for i in range(count)],
                           tools=TOOLS, tool_choice=choice, parallel_tool_calls=False)
        for out in outs:
            calls = out.outputs[0].tool_calls
            assert out.outputs[0].finish_reason == "stop" and len(calls) == 1, out.outputs[0].text
            jsonschema.validate(json.loads(calls[0].arguments), SCHEMAS[calls[0].name])
            if isinstance(choice, dict):
                assert calls[0].name == choice["function"]["name"]
                assert json.loads(calls[0].arguments) == json.loads(out.outputs[0].text)
    # parallel calls: an array of one or more, each validating
    out = smollm.chat(WEATHER_ASK, SamplingParams(max_tokens=300, temperature=0), tools=TOOLS,
                      tool_choice="required")[0].outputs[0]
    assert out.tool_calls and [json.loads(c.arguments) for c in out.tool_calls] == \
        [item["arguments"] for item in json.loads(out.text)]


def test_auto_mode_on_real_text(smollm):
    """The embedded model answers in prose when it does not call: content, no calls; its output parsed
    exactly as the parser gives it."""
    out = smollm.chat(WEATHER_ASK, SamplingParams(max_tokens=24, temperature=0), tools=TOOLS)[0].outputs[0]
    request = parse_tool_request(TOOLS, "auto")
    assert out.tool_calls == parse_output(request, out.text).tool_calls
    if "<tool_call>" not in out.text:
        assert out.tool_calls == []


# ---- the model's own formats --------------------------------------------------------------------
WEATHER = {"city": "Paris", "unit": "celsius", "options": {"hourly": True, "fields": ["rain"]}}
TIME = {"timezone": "CET"}
OUTPUTS = {
    HERMES: ('Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) +
             '}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": ' + json.dumps(TIME) + '}\n</tool_call>'),
    MISTRAL: ('[TOOL_CALLS] [{"name": "get_weather", "arguments": ' + json.dumps(WEATHER) +
              '}, {"name": "get_time", "arguments": ' + json.dumps(TIME) + '}]'),
    LLAMA3: ('{"name": "get_weather", "parameters": ' + json.dumps(WEATHER) + '}; {"name": "get_time", '
             '"parameters": ' + json.dumps(TIME) + '}'),
}


def _stream(parser, text: str, seed: int) -> tuple[str, list[dict]]:
    """Feed text in random pieces; the content and the calls joined from the deltas."""
    rng = random.Random(seed)
    content, deltas, end = "", [], 0
    while end < len(text):
        end = min(len(text), end + rng.randint(1, 6))
        c, d = parser.feed(text[:end])
        content, deltas = content + c, deltas + d
    c, d, _ = parser.finish(text)
    content, deltas = content + c, deltas + d
    calls = []
    for delta in deltas:
        if "id" in delta:
            calls.append({"name": delta["function"]["name"], "arguments": ""})
        calls[delta["index"]]["arguments"] += delta["function"].get("arguments", "")
    return content, calls


@pytest.mark.parametrize("fmt", [HERMES, MISTRAL, LLAMA3])
def test_call_formats_parse_whole_and_streamed(fmt):
    request = parse_tool_request(TOOLS, "auto")
    request = type(request)(**{**request.__dict__, "format": fmt})
    parsed = parse_output(request, OUTPUTS[fmt])
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", WEATHER),
                                                                             ("get_time", TIME)]
    assert parsed.content == ("Let me look." if fmt == HERMES else None)
    for seed in range(5):
        content, calls = _stream(ToolStreamParser(request), OUTPUTS[fmt], seed)
        assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", WEATHER),
                                                                           ("get_time", TIME)]
        assert content.strip() == (parsed.content or "")
    # Plain text, or a call to an unknown function, stays content.
    for text in ("Paris is sunny. <tool_", '<tool_call>\n{"name": "rm_rf", "arguments": {}}\n</tool_call>',
                 '[TOOL_CALLS] [{"name": "rm_rf", "arguments": {}}]', '{"name": "rm_rf", "parameters": {}}'):
        assert parse_output(request, text).tool_calls == [] and parse_output(request, text).content == text
        content, calls = _stream(ToolStreamParser(request), text, 0)
        assert calls == [] and content == text, (fmt, text, content)


def test_forced_outputs_stream_as_deltas():
    named = parse_tool_request(TOOLS, {"type": "function", "function": {"name": "get_time"}})
    text = json.dumps(TIME)
    assert _stream(ToolStreamParser(named), text, 1) == ("", [{"name": "get_time", "arguments": text}])
    required = parse_tool_request(TOOLS, "required")
    text = json.dumps([{"name": "get_weather", "arguments": WEATHER}, {"name": "get_time", "arguments": TIME}])
    content, calls = _stream(ToolStreamParser(required), text, 2)
    assert content == "" and required.format == HERMES  # the array is the calls, not content beside them
    assert [(c["name"], json.loads(c["arguments"])) for c in calls] == [("get_weather", WEATHER),
                                                                       ("get_time", TIME)]
    # cut by max_tokens: no call, the text is the content
    assert parse_output(required, text[:30]).tool_calls == [] and parse_output(required, text[:30]).content


# ---- reasoning ----------------------------------------------------------------------------------
def test_reasoning_split_whole_and_streamed(qwen_dirs):
    tok = AutoTokenizer.from_pretrained(str(qwen_dirs["qwen3"]))
    thinking = plan_chat(tok, WEATHER_ASK, SamplingParams())
    quiet = plan_chat(tok, WEATHER_ASK, SamplingParams(), chat_template_kwargs={"enable_thinking": False})
    assert thinking.reasoning and quiet.reasoning
    assert tok.decode(quiet.prompt_ids).endswith("<think>\n\n</think>\n\n")
    assert not tok.decode(thinking.prompt_ids).endswith("</think>\n\n")
    assert not plan_chat(AutoTokenizer.from_pretrained(str(qwen_dirs["qwen2"])), WEATHER_ASK,
                         SamplingParams()).reasoning
    text = "<think>\nThe user wants Paris.\nCall the tool.\n</think>\n\nIt is sunny in Paris."
    assert split_reasoning(text) == ("The user wants Paris.\nCall the tool.", "It is sunny in Paris.")
    assert split_reasoning("<think>\nstill thinking") == ("still thinking", "")
    assert split_reasoning("No thoughts.") == (None, "No thoughts.")
    assert split_reasoning("I thought.</think>Answer", starts_thinking=True) == ("I thought.", "Answer")
    # with tools: the calls are looked for after the thinking
    plan = plan_chat(tok, WEATHER_ASK, SamplingParams(), TOOLS)
    output = "<think>\nuse <tool_call> maybe\n</think>\n\n" + OUTPUTS[HERMES]
    message = parse_chat_output(plan, output)
    assert message.reasoning_content == "use <tool_call> maybe" and message.content == "Let me look."
    assert [c.name for c in message.tool_calls] == ["get_weather", "get_time"]
    assert message.finish_reason("stop") == "tool_calls" and message.finish_reason("length") == "length"
    for seed in range(5):
        rng = random.Random(seed)
        parser, reasoning, content, calls, end = ChatStreamParser(plan), "", "", [], 0
        while end < len(output):
            end = min(len(output), end + rng.randint(1, 5))
            delta = parser.feed(output[:end])
            reasoning, content, calls = reasoning + delta.reasoning, content + delta.content, calls + delta.tool_calls
        delta = parser.finish(output)
        reasoning, content, calls = reasoning + delta.reasoning, content + delta.content, calls + delta.tool_calls
        assert reasoning == message.reasoning_content and content.strip() == message.content
        assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"] and parser.made_calls


def test_llm_chat_splits_reasoning(qwen_dirs):
    llm = LLM(str(qwen_dirs["qwen3"]), dtype="float32")
    try:
        out = llm.chat(WEATHER_ASK, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
        assert (out.reasoning_content, out.text) == (split_reasoning(out.text)[0], out.text)
        out = llm.chat(WEATHER_ASK, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
                       chat_template_kwargs={"enable_thinking": False})[0].outputs[0]
        assert out.reasoning_content is None  # the template closed the thinking in the prompt
    finally:
        llm.shutdown()


def test_auto_mode_holds_an_opened_call_to_the_schemas(tiny_models):
    """tool_choice auto: free text until the output opens a call, then the call held to the tools'
    schemas until it closes, then free again. A random model never writes <tool_call> itself, so the
    trigger here is a piece of its own greedy output: what follows it must be a valid call."""
    from dashinfer_core.guided.spec import TriggeredSpec
    llm = LLM(str(tiny_models["llama"]), dtype="float32")
    try:
        tok = llm.get_tokenizer()
        regex = parse_tool_request(TOOLS, "auto").triggered_spec().regex
        for prompt in ([5, 6, 7, 8], [300, 301], [42] * 7):
            greedy = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
            free = llm.generate([prompt], greedy)[0].outputs[0]
            trigger = tok.decode(free.token_ids[:3])
            assert free.text.startswith(trigger) and trigger.strip()
            params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
            params.triggered_spec = TriggeredSpec(trigger, regex)
            out = llm.generate([prompt], params)[0].outputs[0]
            assert out.text.startswith(trigger), out.text[:80]
            call_text, closed, after = out.text[len(trigger):].partition("</tool_call>")
            assert closed, out.text
            call = json.loads(call_text)
            jsonschema.validate(call["arguments"], SCHEMAS[call["name"]])
            assert after and out.finish_reason == "length"  # free text again after the call
        assert llm.engine.scheduler.block_manager.num_free_blocks == llm.engine.scheduler.block_manager.num_blocks
    finally:
        llm.shutdown()
    # The chat layer sets it for auto in the Hermes format only, and never over a guided field.
    tok = AutoTokenizer.from_pretrained(str(tiny_models["llama"]))
    tok.chat_template = template(False)
    assert plan_chat(tok, WEATHER_ASK, SamplingParams(), TOOLS).params.triggered_spec.trigger == "<tool_call>"
    assert plan_chat(tok, WEATHER_ASK, SamplingParams(), TOOLS, "required").params.triggered_spec is None
    assert plan_chat(tok, WEATHER_ASK, SamplingParams(json_object=True), TOOLS).params.triggered_spec is None
    # Mistral: [TOOL_CALLS] opens an array of calls, and is a control token the text must keep
    tok.chat_template = "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}" \
        "{% for m in messages %}[INST]{{ m['content'] }}[/INST]{% endfor %}{# [TOOL_CALLS] #}"
    mistral = plan_chat(tok, WEATHER_ASK, SamplingParams(), TOOLS).params
    assert mistral.triggered_spec.trigger == "[TOOL_CALLS]" and not mistral.skip_special_tokens
    import re
    call = ' [{"name":"get_time","arguments":{"timezone":"CET"}}]'
    assert re.fullmatch(mistral.triggered_spec.regex, call)
