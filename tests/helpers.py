"""Test helpers: tiny model builders and HF reference generation."""
from __future__ import annotations

import base64
import io
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import torch

TINY_COMMON = dict(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                   # Wider than the default 0.02 so logits are spread out and greedy ties are rare.
                   initializer_range=0.25)


def tiny_config(family: str):
    import transformers
    if family == "llama":
        return transformers.LlamaConfig(
            **TINY_COMMON, tie_word_embeddings=False,
            rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 64,
                             "rope_theta": 10000.0})
    if family == "mistral":
        return transformers.MistralConfig(
            **TINY_COMMON, tie_word_embeddings=False,
            rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})
    if family == "qwen2":
        return transformers.Qwen2Config(**TINY_COMMON, tie_word_embeddings=True)
    if family == "qwen3":
        return transformers.Qwen3Config(**TINY_COMMON, head_dim=32, tie_word_embeddings=False)
    # MoE: layer 0 dense (mlp_only_layers) and layer 1 sparse for Qwen2-MoE, with its shared expert.
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**TINY_COMMON, tie_word_embeddings=False, num_experts=8,
                                           num_experts_per_tok=2, moe_intermediate_size=48,
                                           shared_expert_intermediate_size=96, norm_topk_prob=False,
                                           mlp_only_layers=[0])
    if family == "qwen3_moe":
        return transformers.Qwen3MoeConfig(**TINY_COMMON, head_dim=32, tie_word_embeddings=False, num_experts=8,
                                           num_experts_per_tok=8, moe_intermediate_size=32, norm_topk_prob=True)
    if family == "mixtral":
        return transformers.MixtralConfig(**{**TINY_COMMON, "intermediate_size": 64}, tie_word_embeddings=False,
                                          num_local_experts=4, num_experts_per_tok=1)
    if family == "glm":
        return transformers.GlmConfig(**TINY_COMMON, head_dim=16, pad_token_id=0, tie_word_embeddings=False)
    if family == "glm4":
        return transformers.Glm4Config(**TINY_COMMON, head_dim=32, pad_token_id=0, tie_word_embeddings=False)
    raise ValueError(family)


def build_tiny_model(family: str, path: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A random-weight model of `family` saved as an HF directory, with SmolLM2's tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    torch.manual_seed(seed)
    cfg = tiny_config(family)
    cfg.eos_token_id = 2
    cfg.bos_token_id = 1
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family in ("qwen2", "qwen2_moe", "glm", "glm4"):  # q/k/v biases start at zero: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    if family == "glm4":  # its extra post-norms start at one: make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                layer.post_self_attn_layernorm.weight.normal_(1.0, 0.3)
                layer.post_mlp_layernorm.weight.normal_(1.0, 0.3)
    if family in ("qwen3", "qwen3_moe"):
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.q_norm.weight.normal_(1.0, 0.3)
                layer.self_attn.k_norm.weight.normal_(1.0, 0.3)
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(path))
    return path


def mixed_prompts(count: int, vocab: int = 49152, min_len: int = 3, max_len: int = 90, seed: int = 0):
    """Token-id prompts of mixed lengths (avoiding special ids 0..16)."""
    rng = random.Random(seed)
    return [[rng.randrange(17, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


@dataclass
class Reference:
    tokens: list[int]
    top2_gaps: list[float]  # per generated step: top-1 minus top-2 logit


def hf_greedy(model, prompt: list[int], max_new_tokens: int, eos_ids=()) -> Reference:
    """HF transformers greedy generation of one unpadded prompt, with each step's top-2 gap."""
    device = next(model.parameters()).device
    out = model.generate(torch.tensor([prompt], device=device),
                         attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=device),
                         max_new_tokens=max_new_tokens, do_sample=False, output_logits=True,
                         return_dict_in_generate=True, eos_token_id=list(eos_ids) or None,
                         pad_token_id=0)
    tokens = out.sequences[0, len(prompt):].tolist()
    gaps = []
    for step_logits in out.logits:
        top2 = step_logits[0].float().topk(2).values
        gaps.append(float(top2[0] - top2[1]))
    return Reference(tokens, gaps)


TIE_TOLERANCE = 1e-4


def compare_greedy(ours: list[int], ref: Reference) -> str:
    """'match', 'tie' (first difference at a numerical tie in HF's logits) or 'mismatch'."""
    n = min(len(ours), len(ref.tokens))
    for i in range(n):
        if ours[i] != ref.tokens[i]:
            return "tie" if ref.top2_gaps[i] < TIE_TOLERANCE else "mismatch"
    return "match" if len(ours) == len(ref.tokens) else "mismatch"


def make_merged_adapter(base_dir: Path, adapter_dir: Path, merged_dir: Path, rank: int = 8, alpha: float = 16.0,
                        targets=("q_proj", "v_proj", "o_proj", "down_proj"), seed: int = 0) -> Path:
    """A random PEFT-format LoRA adapter written without peft, and a copy of the base model with it
    merged into the weights (W + alpha/r * B @ A): the reference where peft is not installed (GPU)."""
    import json
    import shutil
    from safetensors.torch import load_file, save_file
    base_dir, adapter_dir, merged_dir = Path(base_dir), Path(adapter_dir), Path(merged_dir)
    config = json.loads((base_dir / "config.json").read_text())
    weights = load_file(str(base_dir / "model.safetensors"))
    gen = torch.Generator().manual_seed(seed)
    adapter = {}
    for layer in range(config["num_hidden_layers"]):
        for module in targets:
            kind = "self_attn" if module in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            name = f"model.layers.{layer}.{kind}.{module}.weight"
            out_features, in_features = weights[name].shape
            a = torch.randn(rank, in_features, generator=gen) / in_features ** 0.5
            b = torch.randn(out_features, rank, generator=gen) * 0.5
            adapter[f"base_model.model.{name[:-len('.weight')]}.lora_A.weight"] = a
            adapter[f"base_model.model.{name[:-len('.weight')]}.lora_B.weight"] = b
            weights[name] = (weights[name].double() + (alpha / rank) * (b.double() @ a.double())).to(weights[name].dtype)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    save_file(adapter, str(adapter_dir / "adapter_model.safetensors"))
    (adapter_dir / "adapter_config.json").write_text(json.dumps(dict(
        peft_type="LORA", r=rank, lora_alpha=alpha, target_modules=list(targets), bias="none",
        auto_mapping={"base_model_class": config["architectures"][0]})))
    shutil.copytree(base_dir, merged_dir, dirs_exist_ok=True)
    save_file(weights, str(merged_dir / "model.safetensors"), metadata={"format": "pt"})
    return adapter_dir


def make_adapter(base_dir, out_dir, seed: int, **lora_fields):
    """A PEFT adapter with random A and B (PEFT starts B at zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, **lora_fields))
    peft_model.save_pretrained(str(out_dir))
    return out_dir


# ---- vision-language models ----
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}"
    "{% else %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tiny_qwen2_vl(path, tokenizer_dir, family="qwen2_vl", seed=0):
    """Qwen2-VL, or Qwen2.5-VL (windowed vision attention: blocks 0 and 2 attend within 56-pixel windows)."""
    import transformers
    from transformers import AutoTokenizer, Qwen2VLImageProcessor
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    tok.add_special_tokens({"additional_special_tokens": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]})
    tok.chat_template = CHAT_TEMPLATE
    ids = tok.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>"])
    text = dict(vocab_size=-(-len(tok) // 8) * 8, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0},
                initializer_range=0.25, eos_token_id=2, bos_token_id=1)
    tokens = dict(image_token_id=ids[2], vision_start_token_id=ids[0], vision_end_token_id=ids[1],
                  tie_word_embeddings=False)
    if family == "qwen2_vl":
        cfg = transformers.Qwen2VLConfig(text_config=text, **tokens, vision_config=dict(
            depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3, initializer_range=0.25))
        model_cls = transformers.Qwen2VLForConditionalGeneration
    else:
        cfg = transformers.Qwen2_5_VLConfig(text_config=text, **tokens, vision_config=dict(
            depth=4, hidden_size=32, intermediate_size=48, out_hidden_size=64, num_heads=4, patch_size=14,
            spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
            initializer_range=0.25))
        model_cls = transformers.Qwen2_5_VLForConditionalGeneration
    torch.manual_seed(seed)
    model = model_cls(cfg).to(torch.float32)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    Qwen2VLImageProcessor(min_pixels=28 * 28 * 4, max_pixels=28 * 28 * 40).save_pretrained(str(path))
    return path


def random_image(width, height, seed):
    from PIL import Image
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_tiny_gguf(path: Path, family: str = "llama", seed: int = 0, types: dict | None = None):
    """A random-weight tiny model written as GGUF the way llama.cpp's converter writes it (q/k rows
    permuted for llama), its weights quantized by gguf-py. types: GGUF tensor suffix -> type name, e.g.
    {"attn_q": "Q4_1"}; `blk.0.attn_v` style keys override one layer. No tokenizer in the file."""
    import gguf
    import transformers
    torch.manual_seed(seed)
    common = dict(TINY_COMMON, initializer_range=0.1)
    if family == "llama":
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False)
    else:
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    if family == "qwen2":
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    default = {"token_embd": "Q8_0", "output": "Q4_1", "attn_q": "Q4_1", "attn_k": "Q4_0", "attn_v": "Q4_1",
               "attn_output": "Q8_0", "ffn_gate": "Q4_1", "ffn_up": "Q4_1", "ffn_down": "Q4_0"}
    types = {**default, **(types or {})}
    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w = gguf.GGUFWriter(str(path), family)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        top = {"model.embed_tokens.weight": "token_embd", "lm_head.weight": "output", "model.norm.weight": "output_norm"}
        if name in top:
            short, gname = top[name], top[name] + ".weight"
        else:
            parts = name.split(".")
            short = names[".".join(parts[3:-1])]
            gname = f"blk.{parts[2]}.{short}.{parts[-1]}"
        a = tensor.numpy().astype(np.float32)
        if family == "llama" and short in ("attn_q", "attn_k") and parts[-1] == "weight":
            heads = cfg.num_attention_heads if short == "attn_q" else cfg.num_key_value_heads
            a = a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        qtype = "F32" if a.ndim == 1 else types.get(gname.rsplit(".", 1)[0], types.get(short, "F32"))
        qt = gguf.GGMLQuantizationType[qtype]
        w.add_tensor(gname, a if qtype == "F32" else gguf.quants.quantize(a, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


# ---- reasoning models ----
# ChatML whose assistant turn opens <think> in the prompt (as DeepSeek-R1's and QwQ's templates do), or
# closes it empty with enable_thinking=False (as Qwen3's does): a random model's output is then all
# thinking, or all answer, which is what the split is checked against.
THINKING_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n"
    "{% if enable_thinking is defined and not enable_thinking %}\n</think>\n\n{% endif %}{% endif %}")


def build_tiny_thinker(path: Path, tokenizer_dir: Path) -> Path:
    """A tiny random Qwen3 whose chat template thinks first (THINKING_TEMPLATE)."""
    from transformers import AutoTokenizer
    build_tiny_model("qwen3", path, tokenizer_dir)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = THINKING_TEMPLATE
    tok.save_pretrained(str(path))
    return path
