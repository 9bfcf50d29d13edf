"""`dashinfer-core generate | chat | bench | env`: the engine from the shell."""
from __future__ import annotations

import argparse
import asyncio
import sys
import time

from .config import DTYPES, QUANTIZATION_MODES
from .engine_args import add_engine_args, engine_config_from_args
from .sampling_params import SamplingParams

# generate and chat take a request --seed (sampling); the engine's default seed stays the config's.
SAMPLING_COMMAND_SKIPS = ("seed",)


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--lora", default=None, metavar="NAME=PATH",
                   help="run with this PEFT LoRA adapter (turns enable_lora on)")


def sampling_params(args) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                          seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos)


def lora_request(args):
    """--lora NAME=PATH as a LoRARequest (None without it)."""
    if not args.lora:
        return None
    from .lora import LoRARequest
    name, sep, path = args.lora.partition("=")
    if not sep or not name or not path:
        raise SystemExit(f"--lora: expected NAME=PATH, got {args.lora!r}")
    return LoRARequest(name, 1, path)


def cli_engine_config(args):
    return engine_config_from_args(args, **({"enable_lora": True} if args.lora else {}))


async def stream_to_stdout(engine, prompt_ids, params, lora=None) -> str:
    text = []
    async for out in engine.generate(prompt_ids, params, lora_request=lora):
        delta = out.outputs[0].delta_text
        text.append(delta)
        sys.stdout.write(delta)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(text)


def cmd_generate(args) -> int:
    from .llm import LLM
    lora = lora_request(args)
    llm = LLM(config=cli_engine_config(args))
    prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    try:
        for out in llm.generate(prompts, sampling_params(args), lora_request=lora):
            print(out.text if len(prompts) == 1 else f"[{out.request_id}] {out.text!r} ({out.finish_reason})")
    finally:
        llm.shutdown()
    return 0


def cmd_chat(args) -> int:
    from .engine.async_engine import AsyncEngine
    from .llm import apply_chat_template
    lora = lora_request(args)
    engine = AsyncEngine(cli_engine_config(args))
    params = sampling_params(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    try:
        while True:
            try:
                user = input("you> ") if args.message is None else args.message
            except EOFError:
                break
            messages.append({"role": "user", "content": user})
            sys.stdout.write("assistant> ")
            reply = asyncio.run(stream_to_stdout(engine, apply_chat_template(engine.tokenizer, messages), params, lora))
            messages.append({"role": "assistant", "content": reply})
            if args.message is not None:
                break
    finally:
        engine.shutdown()
    return 0


def cmd_bench(args) -> int:
    import random

    from .llm import LLM
    llm = LLM(config=engine_config_from_args(args))
    rng = random.Random(0)
    vocab = llm.engine.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(args.input_len)] for _ in range(args.num_prompts)]
    params = SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:1], SamplingParams(max_tokens=2, ignore_eos=True))  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    print(f"{args.num_prompts} prompts x {args.input_len} in / {args.output_len} out: "
          f"{tokens / elapsed:.1f} output tokens/s ({elapsed:.2f} s)")
    return 0


def cmd_env(args) -> int:
    """What this machine offers and which path each CPU setting takes, without loading a model."""
    import json

    import torch

    from .capabilities import choose_cpu_paths, detect, native_bf16
    info = detect().as_dict()
    info["native_bf16"] = native_bf16()
    info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    dtypes = [args.dtype] if args.dtype else [d for d in DTYPES if d != "auto"]
    quants = [args.quantization] if args.quantization else [None, *QUANTIZATION_MODES]
    dtype_of = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    choices = {f"{d}/{q or 'none'}": {name: str(c) for name, c in choose_cpu_paths(
        dtype_of[d], q, args.group_size, args.enforce_eager).items()} for d in dtypes for q in quants}
    if args.json:
        print(json.dumps({"platform": info, "cpu_paths": choices}, indent=2))
        return 0
    for key, value in info.items():
        print(f"{key:16} {value}")
    for setting, paths in choices.items():
        print(f"\n[{setting}]")
        for name, choice in paths.items():
            print(f"  {name:20} {choice}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dashinfer-core", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="complete prompts (arguments, or one per stdin line)")
    p.add_argument("prompt", nargs="*")
    add_engine_args(p, skip=SAMPLING_COMMAND_SKIPS)
    add_sampling_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("chat", help="chat with the model, streamed")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--message", default=None, help="send one message and exit")
    add_engine_args(p, skip=SAMPLING_COMMAND_SKIPS)
    add_sampling_args(p)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("bench", help="offline throughput on random prompts")
    p.add_argument("--num-prompts", type=int, default=16)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)
    p = sub.add_parser("env", help="what this machine offers and which fast paths the engine takes")
    p.add_argument("--dtype", default=None, choices=[d for d in DTYPES if d != "auto"])
    p.add_argument("--quantization", default=None, choices=QUANTIZATION_MODES)
    p.add_argument("--group-size", type=int, default=None)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_env)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
