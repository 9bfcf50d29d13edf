"""MoE on the CPU: a random Mixtral-style model of ~0.5B parameters (8 experts, top-2) built from a
transformers config, then (1) generation throughput against HF transformers through throughput.py and
(2) one MoE block's time per step against its dense equivalent (a gated MLP as wide as the two chosen
experts together, so the same FLOPs per token).

    python benchmarks/moe.py [--dir /tmp/dashinfer-moe-0.5b] [--num-prompts 64] [--output-len 128]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def build(path: Path) -> None:
    import torch
    import transformers

    from dashinfer_core.loader import default_model_dir
    cfg = transformers.MixtralConfig(vocab_size=49152, hidden_size=1024, intermediate_size=2048, num_hidden_layers=8,
                                     num_attention_heads=16, num_key_value_heads=4, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=4096, tie_word_embeddings=True,
                                     bos_token_id=1, eos_token_id=2, initializer_range=0.05)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    print(f"random Mixtral-style MoE: {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B parameters")
    model.save_pretrained(str(path))
    transformers.AutoTokenizer.from_pretrained(str(default_model_dir())).save_pretrained(str(path))


def layer_times(path: Path, threads: int) -> None:
    import torch

    from dashinfer_core import LLM
    from dashinfer_core.models.llama import MLP
    torch.set_num_threads(threads)
    llm = LLM(str(path), dtype="float32", device="cpu", kv_cache_memory=256 << 20)
    model = llm.engine.runner.model
    moe = model.layers[0].mlp
    cfg = model.cfg
    dense = MLP(cfg, torch.float32, model.tp, intermediate_size=cfg.moe.top_k * cfg.moe.intermediate_size)
    torch.nn.init.normal_(dense.gate_up_proj.weight, std=0.05)
    torch.nn.init.normal_(dense.down_proj.weight, std=0.05)
    print(f"\none block, fp32, {threads} threads: MoE ({cfg.moe.num_experts} experts, top-{cfg.moe.top_k}, "
          f"{cfg.moe.intermediate_size} wide) vs a dense MLP {dense.gate_up_proj.out_features // 2} wide")
    print("| tokens | MoE ms | dense ms | MoE / dense |")
    print("|---|---|---|---|")
    for tokens in (1, 16, 64, 512):
        x = torch.randn(tokens, cfg.hidden_size)
        row = []
        for block in (moe, dense):
            with torch.inference_mode():
                for _ in range(3):
                    block(x)
                reps = 20 if tokens <= 64 else 5
                start = time.perf_counter()
                for _ in range(reps):
                    block(x)
                row.append(1000 * (time.perf_counter() - start) / reps)
        print(f"| {tokens} | {row[0]:.2f} | {row[1]:.2f} | {row[0] / row[1]:.2f} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default="/tmp/dashinfer-moe-0.5b")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-throughput", action="store_true")
    args = p.parse_args(argv)
    path = Path(args.dir)
    if not (path / "config.json").exists():
        build(path)
    if not args.skip_throughput:
        subprocess.run([sys.executable, str(HERE / "throughput.py"), "--engines", "dashinfer-core,hf", "--model",
                        str(path), "--num-prompts", str(args.num_prompts), "--output-len", str(args.output_len),
                        "--threads", str(args.threads), "--tag", "moe"], check=True)
    layer_times(path, args.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
