"""Multi-LoRA serving speed on the embedded SmolLM2-135M-Instruct: 64 requests spread over 8 random
rank-16 adapters (all seven projections) against (1) the same 64 requests on the base model alone,
(2) the same 64 with LoRA turned on but no adapter asked for, and (3) HF transformers + PEFT serving
them with its mixed-adapter batches (`adapter_names`, batches of 16, left-padded). Greedy, EOS
ignored, each run in its own process, one table of tokens/s and ratios.

    python benchmarks/lora.py [--num-prompts 64] [--output-len 128] [--adapters 8] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path("/tmp/dashinfer-lora-bench")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_adapters(base: Path, count: int, rank: int) -> list[Path]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    paths = []
    for i in range(count):
        path = ROOT / f"adapter-{i}-r{rank}"
        if not (path / "adapter_model.safetensors").exists():
            model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
            torch.manual_seed(i)
            peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS))
            with torch.no_grad():  # PEFT starts B at zero; small random B changes the outputs a little
                for name, param in peft_model.named_parameters():
                    if "lora_B" in name:
                        param.normal_(0, 0.01)
            peft_model.save_pretrained(str(path))
        paths.append(path)
    return paths


def make_prompts(count: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, 49000) for _ in range(rng.randint(32, 256))] for _ in range(count)]


def run_engine(spec: dict) -> dict:
    import torch
    torch.set_num_threads(spec["threads"])
    from dashinfer_core import LLM, LoRARequest, SamplingParams
    prompts = make_prompts(spec["num_prompts"])
    options = dict(dtype="float32", device="cpu", num_threads=spec["threads"], enable_prefix_caching=False)
    if spec["mode"] != "base":
        options.update(enable_lora=True, max_loras=len(spec["adapters"]), max_lora_rank=spec["rank"])
    llm = LLM(**options)
    loras = [LoRARequest(f"a{i}", i + 1, path) for i, path in enumerate(spec["adapters"])]
    per_prompt = [loras[i % len(loras)] for i in range(len(prompts))] if spec["mode"] == "lora" else None
    for lora in loras if spec["mode"] == "lora" else []:
        llm.add_lora(lora)
    params = SamplingParams(max_tokens=spec["output_len"], temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True),
                 lora_request=per_prompt[:2] if per_prompt else None)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, lora_request=per_prompt)
    elapsed = time.perf_counter() - start
    return {"tokens": sum(len(o.outputs[0].token_ids) for o in outs), "seconds": elapsed}


def run_hf_peft(spec: dict) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(spec["threads"])
    from dashinfer_core.loader import default_model_dir
    model = AutoModelForCausalLM.from_pretrained(str(default_model_dir()), dtype=torch.float32)
    names = [f"a{i}" for i in range(len(spec["adapters"]))]
    model = PeftModel.from_pretrained(model, spec["adapters"][0], adapter_name=names[0])
    for name, path in zip(names[1:], spec["adapters"][1:]):
        model.load_adapter(path, adapter_name=name)
    model.eval()
    prompts = make_prompts(spec["num_prompts"])
    batch = spec["hf_batch_size"]
    tokens = 0
    start = time.perf_counter()
    for b in range(0, len(prompts), batch):
        chunk = prompts[b:b + batch]
        width = max(len(p) for p in chunk)
        ids = torch.tensor([[0] * (width - len(p)) + p for p in chunk])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=spec["output_len"],
                                 min_new_tokens=spec["output_len"], do_sample=False, pad_token_id=0,
                                 adapter_names=[names[(b + i) % len(names)] for i in range(len(chunk))])
        tokens += (out.shape[1] - width) * len(chunk)
    return {"tokens": tokens, "seconds": time.perf_counter() - start}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf-batch-size", type=int, default=16)
    p.add_argument("--skip-hf", action="store_true")
    p.add_argument("--run", help=argparse.SUPPRESS)  # internal: one measurement, as JSON on stdout
    args = p.parse_args(argv)
    if args.run:
        spec = json.loads(args.run)
        print(json.dumps(run_hf_peft(spec) if spec["mode"] == "hf-peft" else run_engine(spec)))
        return 0
    from dashinfer_core.loader import default_model_dir
    ROOT.mkdir(parents=True, exist_ok=True)
    adapters = [str(a) for a in build_adapters(default_model_dir(), args.adapters, args.rank)]
    spec = dict(num_prompts=args.num_prompts, output_len=args.output_len, threads=args.threads, rank=args.rank,
                adapters=adapters, hf_batch_size=args.hf_batch_size)
    modes = [("base", "dashinfer-core, base model only"), ("lora-idle", "dashinfer-core, LoRA on, no adapter asked"),
             ("lora", f"dashinfer-core, {args.adapters} adapters mixed")]
    if not args.skip_hf:
        modes.append(("hf-peft", f"HF transformers + PEFT, mixed-adapter batches of {args.hf_batch_size}"))
    results = {}
    for mode, label in modes:
        out = subprocess.run([sys.executable, __file__, "--run", json.dumps({**spec, "mode": mode})],
                             capture_output=True, text=True)
        if out.returncode != 0:
            print(f"{label}: failed\n{out.stderr[-2000:]}")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        results[mode] = r["tokens"] / r["seconds"]
        print(f"{label}: {r['tokens']} tokens in {r['seconds']:.1f} s", flush=True)
    print(f"\n{args.num_prompts} prompts of 32-256 tokens x {args.output_len} new tokens, fp32, {args.threads} threads")
    print("| run | tokens/s | vs base | dashinfer LoRA vs this |")
    print("|---|---|---|---|")
    for mode, label in modes:
        if mode in results:
            vs_base = results[mode] / results["base"] if "base" in results else float("nan")
            lora_vs = results["lora"] / results[mode] if "lora" in results else float("nan")
            print(f"| {label} | {results[mode]:.1f} | {vs_base:.2f} | {lora_vs:.2f} |")
    (ROOT / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
