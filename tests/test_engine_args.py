"""Engine flags are generated from EngineConfig's fields: the CLI and the FastChat worker offer every
option, with the dataclass's defaults and choices, and hand back the config the flags say. Also the
one torch.compile wrapper (compiling.compile_or_eager)."""
from __future__ import annotations

import logging
from dataclasses import fields

import pytest

from dashinfer_core.cli import build_parser as cli_parser
from dashinfer_core.compiling import compile_or_eager
from dashinfer_core.config import EngineConfig
from dashinfer_core.engine_args import engine_config_from_args

ALL = {f.name for f in fields(EngineConfig)}


def option_dests(parser) -> set[str]:
    return {a.dest for a in parser._actions}


def subparser(name: str):
    sub = next(a for a in cli_parser()._actions if hasattr(a, "choices") and isinstance(a.choices, dict))
    return sub.choices[name]


def test_every_engine_option_is_a_cli_flag_with_the_dataclass_defaults():
    assert ALL <= option_dests(subparser("bench"))
    # generate/chat: --seed is the request's seed (sampling); everything else is the engine's.
    assert ALL - {"seed"} <= option_dests(subparser("generate"))
    args = subparser("bench").parse_args([])
    assert engine_config_from_args(args) == EngineConfig()


def test_cli_flags_parse_into_the_config():
    args = subparser("generate").parse_args(
        ["hi", "--no-enable-prefix-caching", "--quantization", "iq-int4", "--group-size", "32", "--kv-cache-dtype",
         "uint4", "--max-num-seqs", "3", "--prefix-cache-ttl", "1.5", "--dtype", "bfloat16", "--seed", "7"])
    config = engine_config_from_args(args)
    assert (config.enable_prefix_caching, config.quantization, config.group_size, config.kv_cache_dtype,
            config.max_num_seqs, config.prefix_cache_ttl, config.dtype) == (False, "iq-int4", 32, "uint4", 3, 1.5,
                                                                            "bfloat16")
    assert config.seed == EngineConfig().seed and args.seed == 7  # the request seed, not the engine's


def test_mode_tables_cover_the_config_choices():
    from dashinfer_core.config import KV_CACHE_DTYPES, QUANTIZATION_MODES
    from dashinfer_core.quant.kv import KV_BITS
    from dashinfer_core.quant.linear import QUANT_MODES
    # 'gguf' is a checkpoint format loaded as it is (loader/gguf_loader.py), not a mode quantize_model applies
    assert set(QUANT_MODES) | {"gguf"} == set(QUANTIZATION_MODES) and set(KV_BITS) == set(KV_CACHE_DTYPES)


def test_a_choice_outside_the_dataclass_choices_is_refused(capsys):
    with pytest.raises(SystemExit):
        subparser("bench").parse_args(["--kv-cache-dtype", "fp8"])
    assert "--kv-cache-dtype" in capsys.readouterr().err


def test_fastchat_worker_offers_every_engine_option():
    worker = pytest.importorskip("dashinfer_fastchat.worker")
    parser = worker.build_parser()
    assert ALL - {"model"} <= option_dests(parser)  # the model is FastChat's --model-path
    args = parser.parse_args(["--model-path", "default", "--cpu-cache-memory", "1024", "--enforce-eager",
                              "--attention-backend", "torch"])
    config = worker.worker_engine_config(args)
    assert (config.model, config.cpu_cache_memory, config.enforce_eager, config.attention_backend) == \
        (None, 1024, True, "torch")


def test_compile_or_eager_falls_back_for_good_after_a_failure(caplog):
    calls = []

    def broken_compile_target(x):
        calls.append(x)
        return x + 1

    wrapped = compile_or_eager(broken_compile_target, name="test fn", fallback=lambda x: -x)
    wrapped._compiled = lambda x: (_ for _ in ()).throw(RuntimeError("no C++ compiler"))  # a failing compile
    with caplog.at_level(logging.WARNING, logger="dashinfer_core.compiling"):
        assert wrapped(3) == -3 and wrapped(4) == -4
    assert wrapped.failed and not wrapped.active
    assert sum("test fn" in r.message for r in caplog.records) == 1  # warned once


def test_compile_or_eager_disabled_never_compiles():
    asked = []
    wrapped = compile_or_eager(lambda x: x * 2, enabled=lambda: asked.append(1) or False)
    assert wrapped(5) == 10 and wrapped(6) == 12
    assert wrapped._compiled is None and asked == [1]  # asked once, at the first call


def test_the_default_token_budget_and_an_explicit_one_wins(tiny_models):
    """Unset max_num_batched_tokens on the CPU: 4096 for the offline LLM API in bf16/fp16 (vLLM-CPU's offline
    default), 512 otherwise (fp32's eager activations at 4096 rows raised the peak by 245 MB; a server's running
    decodes wait for the whole step); 2048 on CUDA."""
    import torch

    from dashinfer_core import LLM
    from dashinfer_core.engine.async_engine import AsyncEngine
    from dashinfer_core.engine.llm_engine import default_token_budget
    assert default_token_budget("cpu", torch.bfloat16, offline=True) == 4096
    assert default_token_budget("cpu", torch.float16, offline=True) == 4096
    assert default_token_budget("cpu", torch.float32, offline=True) == 512
    assert default_token_budget("cpu", torch.bfloat16, offline=False) == 512
    assert default_token_budget("cuda", torch.bfloat16, offline=True) == 2048
    model = str(tiny_models["llama"])
    offline = LLM(model, dtype="bfloat16", device="cpu", kv_cache_memory=4 << 20)
    assert offline.engine.scheduler.max_num_batched_tokens == 4096
    chosen = LLM(model, dtype="bfloat16", device="cpu", kv_cache_memory=4 << 20, max_num_batched_tokens=300)
    assert chosen.engine.scheduler.max_num_batched_tokens == 300
    # (eager: its start-up warm-up would compile bf16 layer graphs this check never runs, ~25 s on an AVX2 CPU)
    served = AsyncEngine(EngineConfig(model=model, dtype="bfloat16", device="cpu", kv_cache_memory=4 << 20,
                                      enforce_eager=True))
    try:
        assert served.engine.scheduler.max_num_batched_tokens == 512
    finally:
        served.shutdown()
