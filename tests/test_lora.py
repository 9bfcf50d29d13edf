"""Multi-LoRA: random PEFT adapters made here with `peft` on a tiny random Llama; greedy output equal to
HF transformers + PEFT (fp32) token for token with rows of four adapters and the base model mixed in
one batch under preemption and chunked prefill; slot eviction and reload; the prefix cache keyed by
adapter; quantized base weights; tensor parallel; the bad-adapter table."""
from __future__ import annotations

import asyncio
import json
import shutil

import numpy as np
import pytest
import torch

from dashinfer_core import LLM, AsyncEngine, EngineConfig, InvalidParameterError, LoRARequest, SamplingParams
from dashinfer_core.cache.kv_cache import bytes_per_block
from helpers import build_tiny_model, compare_greedy, hf_greedy, make_adapter, mixed_prompts

# name -> (LoraConfig fields, seed): ranks 4..16, subsets of q/k/v/o/gate/up/down, rslora on one
ADAPTERS = {
    "qv": (dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]), 1),
    "all": (dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                       "gate_proj", "up_proj", "down_proj"]), 2),
    "mlp": (dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"]), 3),
    "ko": (dict(r=12, lora_alpha=24, target_modules=["k_proj", "o_proj"]), 4),
}
PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, default_model_dir):
    root = tmp_path_factory.mktemp("lora")
    base = build_tiny_model("llama", root / "base", default_model_dir)
    adapters = {name: make_adapter(base, root / name, seed, **fields) for name, (fields, seed) in ADAPTERS.items()}
    loras = {name: LoRARequest(name, i + 1, str(path)) for i, (name, path) in enumerate(adapters.items())}
    return root, base, loras


@pytest.fixture(scope="module")
def references(setup):
    """HF + PEFT greedy for each prompt under its adapter (None: the base model alone)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    _, base, loras = setup
    prompts = mixed_prompts(20, max_len=70, seed=5)
    names = [None, "qv", "all", "mlp", "ko"] * 4
    refs = []
    models = {None: AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)}
    for name in ADAPTERS:
        models[name] = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32),
                                                 loras[name].lora_path).eval()
    for prompt, name in zip(prompts, names):
        refs.append(hf_greedy(models[name], prompt, PARAMS.max_tokens))
    return prompts, names, refs


def _run(llm, prompts, names, loras):
    return [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, lora_request=[
        loras[n] if n else None for n in names])]


def test_mixed_adapters_match_hf_peft_under_preemption_and_chunked_prefill(setup, references):
    _, base, loras = setup
    prompts, names, refs = references
    kv = 24 * bytes_per_block(2, 16, 2, 16, torch.float32)  # 24 blocks of 16 tokens: preemption
    llm = LLM(str(base), dtype="float32", device="cpu", block_size=16, max_num_batched_tokens=48, kv_cache_memory=kv,
              enable_lora=True, max_loras=4, max_lora_rank=16)
    got = _run(llm, prompts, names, loras)
    stats = llm.engine.stats()
    assert stats.num_preemptions > 0 and stats.num_free_blocks == stats.num_blocks
    results = [compare_greedy(g, r) for g, r in zip(got, refs)]
    assert "mismatch" not in results and results.count("match") >= 18, list(zip(names, results))
    # every adapter changes the output (an adapter that did nothing would match the base model too)
    base_only = LLM(str(base), dtype="float32", device="cpu").generate(prompts, PARAMS)
    for name in ADAPTERS:
        rows = [i for i, n in enumerate(names) if n == name]
        assert any(got[i] != base_only[i].outputs[0].token_ids for i in rows), name
    assert llm.engine.lora.slot_refs == [0, 0, 0, 0]


def test_slot_and_host_eviction_reload_the_same_outputs(setup, references):
    """Two device slots and two host copies for four adapters: adapters are evicted and read again
    from disk while requests wait; every output stays the same as HF + PEFT's."""
    _, base, loras = setup
    prompts, names, refs = references
    llm = LLM(str(base), dtype="float32", device="cpu", block_size=16, enable_lora=True, max_loras=2,
              max_cpu_loras=2, max_num_seqs=6)
    got = _run(llm, prompts, names, loras)
    manager = llm.engine.lora
    # more slot copies and disk reads than adapters: some were evicted and brought back
    assert manager.num_slot_loads > 4 and manager.num_disk_loads > 4, (manager.num_slot_loads, manager.num_disk_loads)
    results = [compare_greedy(g, r) for g, r in zip(got, refs)]
    assert "mismatch" not in results and results.count("match") >= 18, results
    assert len(manager.pool) <= 2 and llm.list_loras() == {1, 2, 3, 4}
    stats = llm.engine.stats()
    assert (stats.lora_adapters, stats.lora_slot_loads) == (4, manager.num_slot_loads) and stats.lora_host_copies <= 2


def test_prefix_cache_is_keyed_by_adapter(setup):
    _, base, loras = setup
    llm = LLM(str(base), dtype="float32", device="cpu", block_size=16, enable_lora=True)
    prompt = mixed_prompts(1, min_len=70, max_len=70, seed=9)[0]
    first = llm.generate(prompt, PARAMS, lora_request=loras["all"])[0].outputs[0].token_ids
    hits = llm.engine.stats().prefix_device_hit_tokens
    other = llm.generate(prompt, PARAMS, lora_request=loras["qv"])[0].outputs[0].token_ids
    assert llm.engine.stats().prefix_device_hit_tokens == hits  # no hit across adapters
    plain = llm.generate(prompt, PARAMS)[0].outputs[0].token_ids
    assert llm.engine.stats().prefix_device_hit_tokens == hits  # nor between an adapter and the base model
    again = llm.generate(prompt, PARAMS, lora_request=loras["all"])[0].outputs[0].token_ids
    assert llm.engine.stats().prefix_device_hit_tokens > hits and again == first
    assert len({tuple(first), tuple(other), tuple(plain)}) == 3


def test_lora_delta_paths_match_the_row_reference():
    """Every CPU path against row by row, on a merged layer of two shards (rank 3 each): long runs in
    place, gathered decodes as one padded bmm, or segment by segment where padding would waste."""
    from dashinfer_core.lora.layers import LoRABatch, add_lora, lora_delta_ref
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 6, 32, generator=gen)
    b = torch.randn(4, 40, 3, generator=gen)
    short = [2] * 15 + [0] + [2] * 15 + [1] + [2] * 15  # 47 gathered tokens, one slot with 45: no padding
    cases = [([0, 3, -1, 3, 1, 0, 2, -1, 1], 0, True),  # decodes: padded
             ([2] * 50 + [0] + [-1] * 3 + [3] * 20, 2, True),  # two prefill runs, one decode
             (short + [-1], 0, False)]
    for slots, num_runs, padded in cases:
        token_slots = np.array(slots, dtype=np.int32)
        batch = LoRABatch.build(token_slots, 4, torch.device("cpu"), torch.float32)
        assert len(batch.runs) == num_runs and (batch.padded_index is not None) == padded, slots
        assert batch.num_lora_tokens == sum(s >= 0 for s in slots)
        x = torch.randn(len(slots), 32, generator=gen)
        y = torch.randn(len(slots), 40, generator=gen)
        want = y + lora_delta_ref(x, a, b, torch.tensor(slots), (24, 16))
        torch.testing.assert_close(add_lora(y.clone(), x, a, b, batch, (24, 16)), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantization", ["iq-int8", "a8w8"])
def test_quantized_base_with_lora_follows_the_float_model(setup, references, quantization):
    from dashinfer_core.lora.layers import LoRALinear
    from dashinfer_core.quant.linear import QuantizedLinear
    _, base, loras = setup
    prompts, names, refs = references
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, quantization=quantization)
    layer = llm.engine.runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantizedLinear)
    got = _run(llm, prompts, names, loras)
    same_start = sum(g[:3] == r.tokens[:3] for g, r in zip(got, refs))
    assert same_start >= 10, same_start


def test_lora_under_tensor_parallel_equals_one_rank(setup, references):
    _, base, loras = setup
    prompts, names, _ = references
    common = dict(dtype="float32", device="cpu", block_size=16, enable_lora=True, max_loras=4)
    want = _run(LLM(str(base), **common), prompts[:10], names[:10], loras)
    two = LLM(str(base), tensor_parallel_size=2, **common)
    try:
        assert _run(two, prompts[:10], names[:10], loras) == want
    finally:
        two.shutdown()


def _bad_adapters(root, base, loras):
    """name -> (directory, the field the error must name)"""
    from transformers import AutoModelForCausalLM
    import transformers
    from helpers import tiny_config
    bad = {}
    bad["missing directory"] = (root / "nowhere", "lora_path")
    no_weights = root / "bad-no-weights"
    shutil.copytree(loras["qv"].lora_path, no_weights, dirs_exist_ok=True)
    (no_weights / "adapter_model.safetensors").unlink()
    bad["missing weights"] = (no_weights, "adapter_model.safetensors")
    bad["rank over the limit"] = (make_adapter(base, root / "bad-rank", 0, r=32, lora_alpha=8,
                                               target_modules=["q_proj"]), "r")
    bad["unknown target module"] = (make_adapter(base, root / "bad-target", 0, r=4, lora_alpha=8,
                                                 target_modules=["q_proj", "lm_head"]), "target_modules")
    dora = root / "bad-dora"
    shutil.copytree(loras["qv"].lora_path, dora, dirs_exist_ok=True)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    bad["DoRA"] = (dora, "use_dora")
    # Shapes that do not fit: the same family, wider.
    wide_cfg = tiny_config("llama")
    wide_cfg.hidden_size, wide_cfg.intermediate_size = 96, 160
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(wide_cfg).save_pretrained(str(root / "wide-base"))
    bad["shapes"] = (make_adapter(root / "wide-base", root / "bad-shapes", 0, r=4, lora_alpha=8,
                                  target_modules=["q_proj"]), "adapter_model.safetensors")
    # Another architecture with the same shapes.
    other = transformers.Qwen2Config(**{k: getattr(tiny_config("llama"), k) for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")})
    AutoModelForCausalLM.from_config(other).save_pretrained(str(root / "qwen-base"))
    bad["base architecture"] = (make_adapter(root / "qwen-base", root / "bad-arch", 0, r=4, lora_alpha=8,
                                             target_modules=["q_proj"]), "auto_mapping.base_model_class")
    return bad


def test_bad_adapters_are_refused_by_field_and_leave_nothing(setup):
    root, base, loras = setup
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=16)
    for i, (case, (path, field)) in enumerate(_bad_adapters(root, base, loras).items()):
        with pytest.raises(InvalidParameterError) as err:
            llm.generate([[20, 30, 40]], PARAMS, lora_request=LoRARequest(f"bad{i}", 100 + i, str(path)))
        assert err.value.field == field, (case, str(err.value))
        assert llm.list_loras() == set() and not llm.engine.requests, case
    # the engine serves on, and a good adapter still loads
    out = llm.generate([[20, 30, 40]], PARAMS, lora_request=loras["qv"])
    assert len(out[0].outputs[0].token_ids) == PARAMS.max_tokens and llm.list_loras() == {1}
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_request_field_errors(setup):
    _, base, loras = setup
    plain = LLM(str(base), dtype="float32", device="cpu")
    with pytest.raises(InvalidParameterError, match="enable_lora") as err:
        plain.generate([[20, 30]], PARAMS, lora_request=loras["qv"])
    assert err.value.field == "lora_request"
    with pytest.raises(InvalidParameterError) as err:
        LoRARequest("x", 0, "/tmp")
    assert err.value.field == "lora_int_id"
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True)
    assert llm.add_lora(loras["qv"]) and llm.list_loras() == {1}
    with pytest.raises(InvalidParameterError, match="already adapter"):  # the same id, another adapter
        llm.generate([[20, 30]], PARAMS, lora_request=LoRARequest("other", 1, loras["all"].lora_path))
    with pytest.raises(InvalidParameterError) as err:
        EngineConfig(enable_lora=True, max_loras=4, max_cpu_loras=2)
    assert err.value.field == "max_cpu_loras"
    assert llm.remove_lora(1) and llm.list_loras() == set() and not llm.remove_lora(1)


def test_async_engine_streams_adapters_loaded_off_the_loop(setup, references):
    from dashinfer_core import RequestFailedError
    root, base, loras = setup
    prompts, names, refs = references
    engine = AsyncEngine(EngineConfig(model=str(base), dtype="float32", device="cpu", enable_lora=True))

    async def one(prompt, lora):
        final = None
        async for out in engine.generate(prompt, PARAMS, lora_request=lora):
            final = out
        return final.outputs[0].token_ids

    async def main():
        got = await asyncio.gather(*(one(p, loras[n] if n else None) for p, n in zip(prompts[:10], names[:10])))
        with pytest.raises(RequestFailedError) as err:
            await one(prompts[0], LoRARequest("bad", 50, str(root / "nowhere")))
        assert err.value.is_client_error and "lora_path" in str(err.value)
        assert await engine.list_loras() == {1, 2, 3, 4}
        assert await engine.remove_lora(4) and await engine.list_loras() == {1, 2, 3}
        assert await engine.add_lora(loras["ko"])
        return got

    try:
        got = asyncio.run(main())
    finally:
        engine.shutdown()
    results = [compare_greedy(g, r) for g, r in zip(got, refs[:10])]
    assert "mismatch" not in results and results.count("match") >= 9, results


def test_adapter_equals_its_merged_weights(setup, tmp_path):
    """Without peft in the loop: an adapter written by hand against the base model with the adapter
    merged into its weights (the check tests/gpu/test_cuda_lora.py runs on CUDA)."""
    from helpers import make_merged_adapter
    from transformers import AutoModelForCausalLM
    _, base, _ = setup
    adapter = make_merged_adapter(base, tmp_path / "adapter", tmp_path / "merged", rank=8, seed=11)
    prompts = mixed_prompts(8, max_len=60, seed=12)
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True, max_lora_rank=8)
    lora = LoRARequest("handmade", 9, str(adapter))
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, PARAMS, lora_request=lora)]
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32)
    results = [compare_greedy(g, hf_greedy(merged, p, PARAMS.max_tokens)) for g, p in zip(got, prompts)]
    assert "mismatch" not in results and results.count("match") >= 7, results


def test_aborting_a_request_parked_on_its_adapter_load(setup):
    """The load finishes after its only request was aborted: the adapter is kept, the engine goes idle
    (no step spins on the finished load) and nothing is left behind."""
    _, base, loras = setup
    from dashinfer_core import LLMEngine
    engine = LLMEngine(EngineConfig(model=str(base), dtype="float32", device="cpu", enable_lora=True))
    engine.add_request("r", [20, 30, 40], PARAMS, lora_request=loras["mlp"])
    assert engine.lora.parked and engine.get_request_status("r") == "waiting"
    engine.abort_request("r")
    assert not engine.lora.parked and not engine.requests
    engine.lora.loading[loras["mlp"].lora_int_id].result(timeout=60)
    assert engine.has_runnable_work()  # the finished load is news once
    assert engine.step() == [] and not engine.lora.loading and not engine.has_runnable_work()
    assert engine.list_loras() == {loras["mlp"].lora_int_id} and engine.stats().lora_disk_loads == 1
    engine.shutdown()


def test_cli_generate_with_an_adapter(setup, capsys):
    from dashinfer_core import cli
    _, base, loras = setup
    prompt = "Hello there"
    args = ["generate", "--model", str(base), "--dtype", "float32", "--max-tokens", "6", "--ignore-eos", prompt]
    assert cli.main(args + ["--lora", f"all={loras['all'].lora_path}"]) == 0
    with_adapter = capsys.readouterr().out
    llm = LLM(str(base), dtype="float32", device="cpu", enable_lora=True)
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    want = llm.generate(prompt, params, lora_request=LoRARequest("all", 1, loras["all"].lora_path))[0].outputs[0].text
    assert with_adapter == want + "\n" and want != llm.generate(prompt, params)[0].outputs[0].text
