"""DashInfer 1.x (CPU build, `pip install dashinfer==1.3.0`) runner for the peer benchmark.

    benchmarks/.venvs/dashinfer/bin/python benchmarks/peers/dashinfer_runner.py '<SPEC_JSON>'

The HF checkpoint is converted once into DashInfer's own format (.dimodel/.ditensors) under
~/.cache/dashinfer-peer/ (or spec["dashinfer_cache"]); that, and the engine start, are outside the
timed phase. SmolLM2 runs as DashInfer's `LLaMA_v2` model type.

Two fixes are applied at conversion time:
- rope base: DashInfer's LLaMA_v2 graph never passes a rotary base to its rotary ops, so they fall
  back to 10000; SmolLM2 uses 100000 (transformers 5 keeps it under config["rope_parameters"]). The
  runner reads it from config.json and writes it into every rotary op of the graph.
- tied embeddings: the checkpoint stores no lm_head; the embedding matrix is passed as lm_head.

Batched mode starts every request at once (DashInfer batches them continuously, engine_max_batch =
number of prompts); single_stream starts one, waits for it, then the next.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ENGINE = "dashinfer-1.x"


def _rope_theta(cfg: dict) -> float:
    if cfg.get("rope_theta") is not None:
        return float(cfg["rope_theta"])
    params = cfg.get("rope_parameters") or {}
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return 10000.0


def _model_config(model_dir: Path) -> dict:
    cfg = json.loads((model_dir / "config.json").read_text())
    if cfg.get("model_type") != "llama":
        raise ValueError(f"only Llama-architecture checkpoints are wired up here, got {cfg.get('model_type')!r}")
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    if head_dim * cfg["num_attention_heads"] != cfg["hidden_size"]:
        raise ValueError("DashInfer's LLaMA_v2 graph assumes head_dim * num_heads == hidden_size")
    cfg["size_per_head"] = head_dim      # LLaMA_v2 reads this (its default is 128)
    cfg["rope_theta_resolved"] = _rope_theta(cfg)
    return cfg


def _load_state_dict(model_dir: Path, torch_dtype, tie: bool):
    from safetensors.torch import load_file
    state = {}
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    for f in files:
        state.update(load_file(str(f)))
    state = {k: v.to(torch_dtype).contiguous() for k, v in state.items()}
    if "lm_head.weight" not in state:
        if not tie:
            raise KeyError("lm_head.weight missing and tie_word_embeddings is false")
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    return state


def _convert(allspark, model_dir: Path, cfg: dict, data_type: str, save_dir: Path, name: str,
             rotary_base: float) -> None:
    """HF safetensors -> DashInfer .dimodel/.ditensors, with the rope base written into the graph."""
    import numpy as np
    import torch
    from dashinfer.allspark.model.llama_v2 import LLaMA_v2

    class SmolLLaMA(LLaMA_v2):
        def _build_graph(self, torch_cfg, derive_type):
            super()._build_graph(torch_cfg, derive_type)
            patched = 0
            for gname in list(self.model.graph_names):
                for op in self.model.graphs[gname].ops:
                    if op.op_type in ("Rotary", "RotaryMulQuery"):
                        op.attr["rotary_base"] = np.float32(rotary_base).tobytes()
                        patched += 1
            if patched == 0:
                raise RuntimeError("no rotary op found to carry the rope base")

    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[data_type]
    state = _load_state_dict(model_dir, torch_dtype, bool(cfg.get("tie_word_embeddings", False)))
    engine = allspark.Engine()
    engine.engine.model_map["LLaMA_v2"] = SmolLLaMA
    save_dir.mkdir(parents=True, exist_ok=True)
    engine.serialize_model_from_torch(
        model_name=name, model_type="LLaMA_v2", torch_model=state, model_config=cfg,
        save_dir=str(save_dir), multinode_mode=0, data_type=data_type,
        model_sequence_length=int(cfg.get("max_position_embeddings", 2048)), rotary_base=rotary_base)


def _gen_config(prompt_len: int, output_len: int) -> dict:
    total = prompt_len + output_len
    return {
        # greedy: one candidate, no sampling noise
        "do_sample": False, "top_k": 1, "top_p": 0.0, "temperature": 1.0,
        "repetition_penalty": 1.0, "presence_penalty": 0.0, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1, "seed": 0,
        # lengths count the prompt; min_length == max_length keeps EOS from ending a request early
        "max_length": total, "min_length": total, "early_stopping": False,
        "eos_token_id": 2, "stop_words_ids": [], "bad_words_ids": [],
    }


class _Req:
    def __init__(self, idx, prompt):
        self.idx, self.prompt = idx, prompt
        self.tokens: list[int] = []
        self.first_t = None
        self.last_t = None
        self.status = None
        self.error = None
        self.submit_t = 0.0


def _drain(allspark, engine, name, req: _Req, handle, queue, clock) -> None:
    """Block on the request's queue until it finishes (queue.Get() blocks until tokens arrive)."""
    S = allspark.GenerateRequestStatus
    try:
        while True:
            status = queue.GenerateStatus()
            if status in (S.Init, S.ContextFinished, S.Generating):
                elem = queue.Get()
                if elem is not None and len(elem.ids_from_generate) > 0:
                    now = clock()
                    if req.first_t is None:
                        req.first_t = now
                    req.last_t = now
                    req.tokens.extend(int(t) for t in elem.ids_from_generate)
            elif status == S.GenerateFinished:
                # tokens may still sit in the queue after the final status flips
                while True:
                    elem = queue.GetNoWait()
                    if elem is None or len(elem.ids_from_generate) == 0:
                        break
                    now = clock()
                    if req.first_t is None:
                        req.first_t = now
                    req.last_t = now
                    req.tokens.extend(int(t) for t in elem.ids_from_generate)
                break
            else:
                req.error = f"request {req.idx} ended with status {status}"
                break
        req.status = status
    except Exception as exc:  # noqa: BLE001
        req.error = f"request {req.idx}: {exc!r}"
    finally:
        engine.release_request(name, request_handle=handle)


def _start(allspark, engine, name, prompt, output_len):
    import torch
    from torch.utils.dlpack import to_dlpack
    ids = torch.tensor([prompt], dtype=torch.int64)
    status, handle, queue = engine.start_request(name, {"input_ids": to_dlpack(ids)},
                                                 generate_config=_gen_config(len(prompt), output_len))
    if status != allspark.AsStatus.ALLSPARK_SUCCESS:
        raise RuntimeError(f"start_request failed: {status}")
    return handle, queue


def _run_batch(allspark, engine, name, prompts, output_len, single_stream):
    clock = C.Clock()
    reqs = [_Req(i, p) for i, p in enumerate(prompts)]
    if single_stream:
        for r in reqs:
            r.submit_t = clock()
            handle, queue = _start(allspark, engine, name, r.prompt, output_len)
            _drain(allspark, engine, name, r, handle, queue, clock)
    else:
        threads = []
        for r in reqs:
            handle, queue = _start(allspark, engine, name, r.prompt, output_len)
            t = threading.Thread(target=_drain, args=(allspark, engine, name, r, handle, queue, clock), daemon=True)
            t.start()
            threads.append(t)
        for t in threads:
            t.join()
    elapsed = clock()
    return reqs, elapsed


def run(spec: dict) -> dict:
    threads = int(spec["threads"])
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch
    torch.set_num_threads(threads)
    from dashinfer import allspark

    model_dir = Path(spec["model_dir"]).expanduser()
    prompts = C.load_prompts(spec)
    output_len = int(spec["output_len"])
    single = bool(spec.get("single_stream"))
    cfg = _model_config(model_dir)
    rotary_base = float(spec.get("dashinfer_rotary_base", cfg["rope_theta_resolved"]))

    want = spec["dtype"]
    if want not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {want!r} not supported")
    # DashInfer 1.x on the CPU runs fp32 weights only (bf16 weights segfault in its warm-up). Its
    # bf16 mode is matmul_precision "medium": fp32 weights and activations, GEMMs in bf16 (needs
    # avx512_bf16 on x86). "highest" keeps every GEMM in fp32.
    data_type = "float32"
    matmul_precision = "highest" if want == "float32" else "medium"

    st = (model_dir / "config.json").stat()
    weights_sig = "".join(f"{f.name}:{f.stat().st_size}:{int(f.stat().st_mtime)}"
                          for f in sorted(model_dir.glob("*.safetensors")))
    key = hashlib.sha1(f"{model_dir}|{st.st_mtime}|{weights_sig}|{rotary_base}|v1".encode()).hexdigest()[:10]
    name = f"smollm2_{data_type}_{key}"
    cache = Path(spec.get("dashinfer_cache") or Path.home() / ".cache" / "dashinfer-peer").expanduser()
    dimodel, ditensors = cache / f"{name}.dimodel", cache / f"{name}.ditensors"
    t_conv = time.perf_counter()
    converted = False
    if not (dimodel.exists() and ditensors.exists() and ditensors.stat().st_size > 0):
        # In a child process, so that the conversion's memory stays out of this process's peak RSS.
        job = {"model_dir": str(model_dir), "data_type": data_type, "save_dir": str(cache), "name": name,
               "rotary_base": rotary_base}
        proc = subprocess.run([sys.executable, __file__, "--convert", json.dumps(job)],
                              stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0 or not dimodel.exists():
            for f in (dimodel, ditensors):
                f.unlink(missing_ok=True)
            raise RuntimeError(f"model conversion failed (exit {proc.returncode}), see stderr")
        converted = True
    t_conv = time.perf_counter() - t_conv

    max_len = max(len(p) for p in prompts) + output_len + 8
    max_batch = 1 if single else len(prompts)
    engine = allspark.Engine()
    mc = allspark.AsModelConfig(
        model_name=name, model_path=str(dimodel), weights_path=str(ditensors), compute_unit="CPU:0",
        engine_max_length=max_len, engine_max_batch=max_batch, num_threads=threads,
        matmul_precision=matmul_precision)
    mc.cache_mode = allspark.AsCacheMode.AsCacheDefault
    mc.prefill_mode = allspark.AsMHAPrefill.AsPrefillDefault
    engine.build_model_from_config_struct(mc)
    status = engine.start_model(name)
    if status != allspark.AsStatus.ALLSPARK_SUCCESS:
        raise RuntimeError(f"start_model failed: {status}")
    try:
        if spec.get("warmup", True):
            _run_batch(allspark, engine, name, [prompts[0][:16]], 2, True)
        reqs, elapsed = _run_batch(allspark, engine, name, prompts, output_len, single)
    finally:
        engine.stop_model(name)
        engine.release_model(name)

    errors = [r.error for r in reqs if r.error]
    outputs = [r.tokens for r in reqs]
    C.dump_tokens(spec, outputs)
    num_tokens = sum(len(o) for o in outputs)
    # batched: from the start of the generation phase; single stream: from each request's submission
    ttfts = [r.first_t - r.submit_t for r in reqs if r.first_t is not None]
    tpots = [(r.last_t - r.first_t) / (len(r.tokens) - 1) * 1000 for r in reqs
             if r.first_t is not None and len(r.tokens) > 1]
    precision = ("fp32 weights and GEMMs (matmul_precision highest)" if want == "float32" else
                 "bfloat16 requested: fp32 weights, bf16 GEMMs (matmul_precision medium; DashInfer 1.x "
                 "CPU has no bf16 weights)")
    note = (f"{precision}, {threads} threads, "
            f"{'single stream' if single else f'continuous batching, engine_max_batch {max_batch}'}, "
            f"LLaMA_v2 graph with rotary_base {rotary_base:g}"
            f"{', converted now in %.1fs' % t_conv if converted else ''}"
            f"{', TTFT from each request submission' if single else ''}")
    note += C.check_lengths(outputs, output_len)
    return C.make_result(ENGINE, num_tokens=num_tokens, elapsed_s=elapsed, ttfts=ttfts, tpots_ms=tpots,
                         peak_mb=C.peak_mem_mb(), note=note, error="; ".join(errors) or None)


def _convert_main(job_json: str) -> int:
    from dashinfer import allspark
    job = json.loads(job_json)
    model_dir = Path(job["model_dir"])
    _convert(allspark, model_dir, _model_config(model_dir), job["data_type"], Path(job["save_dir"]), job["name"],
             float(job["rotary_base"]))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--convert":
        sys.exit(_convert_main(sys.argv[2]))
    sys.exit(C.main_wrapper(ENGINE, run))
