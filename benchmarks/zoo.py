"""Small random checkpoints of each layout the merger knows, and LoRA adapters that match them.

Built from config under fixed seeds (nothing is downloaded), for the merge tests (tiny: the default
dimensions) and `loopctl bench merge` (bigger: the same builders with larger `**dims`). Each builder
writes a base directory and returns it; `adapter(layout, base, out)` writes a peft adapter with
random nonzero A and B on that base. The quantized checkpoints are written here by hand, with their
own quantizers, independently of loop/merge/formats.py (which the tests check against them). Not a
source of models for the loop itself (see loop/models/fetch.py and tiny.py).
"""
from __future__ import annotations

import json
from pathlib import Path

LAYOUTS = ("llama", "phi3_fused", "gpt2_conv1d", "moe_experts", "fp8_block", "mxfp4")

LLAMA = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=4, max_position_embeddings=64, rms_norm_eps=1e-5)
GPT2 = dict(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
ATTENTION = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, max_position_embeddings=64, initializer_range=0.1)
QWEN3_MOE = dict(**ATTENTION, intermediate_size=48, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2,
                 decoder_sparse_step=1, mlp_only_layers=[])
MIXTRAL = dict(**ATTENTION, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
# hidden 256 gives 2x2 blocks of 128 in q/o_proj; one kv head of 64 and intermediate 96 give single
# partial blocks (ceil-padded rows in k/v/gate/up, columns in down). transformers' FP8 loader, which the
# merger's reference (peft on the dequantized base) goes through, infers the block size from the scale
# grid: exact only for multiples of 128 or one partial block (it refuses intermediate 320, 3 blocks, and
# silently misreads 200 as 2 blocks of 100), so dimensions stay within what it reads exactly.
# Quantized bases keep the default initializer_range 0.02: requantizing base + delta costs a KL that
# grows with the logits' scale (at 0.1 even a correct FP8 merge of the tiny model exceeds 1e-2).
FP8_LLAMA = dict(vocab_size=128, hidden_size=256, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
GPT_OSS = dict(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
               layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
MOE = {"qwen3_moe": QWEN3_MOE, "mixtral": MIXTRAL}

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ADAPTER_TARGETS = {
    "llama": (LINEAR, [], {}),
    "phi3_fused": (LINEAR, [], {}),  # split q/k/v and gate/up modules, as trained on a Llama
    "gpt2_conv1d": (["c_attn", "c_proj", "c_fc"], [], {"fan_in_fan_out": True}),
    "moe_experts": (["q_proj"], EXPERT_PARAMS, {}),
    "fp8_block": (LINEAR, [], {}),
    "mxfp4": (["q_proj"], EXPERT_PARAMS, {}),
}
"""Per layout: adapter target_modules, target_parameters and other LoraConfig fields by default."""
FP8_MAX = 448.0


def random_model(config, seed: int = 0):
    """A causal LM built from `config` with weights drawn under `seed`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save(model, out_dir: str | Path, max_shard_size: str | int | None = None, **kw) -> Path:
    """`model.save_pretrained(out_dir)`, in shards of `max_shard_size` when given."""
    out = Path(out_dir)
    model.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}), **kw)
    return out


def llama(out_dir, *, seed: int = 0, max_shard_size=None, **dims) -> Path:
    """A Llama with separate q/k/v and gate/up Linear modules (`linear`)."""
    from transformers import LlamaConfig

    return save(random_model(LlamaConfig(**{**LLAMA, **dims}), seed), out_dir, max_shard_size)


def phi3_fused(out_dir, *, seed: int = 0, max_shard_size=None, **dims) -> Path:
    """A Phi-3 holding a random Llama's weights with q/k/v and gate/up fused (`fused_rows`); the
    default adapter targets the Llama's split modules. Tied embeddings unless dims say otherwise."""
    from transformers import LlamaConfig

    llama_model = random_model(LlamaConfig(**{**LLAMA, "tie_word_embeddings": True, **dims}), seed)
    return phi3_from_llama(llama_model, out_dir, max_shard_size)


def phi3_from_llama(llama_model, out_dir, max_shard_size=None) -> Path:
    """A Phi-3 checkpoint with the Llama's weights, q/k/v and gate/up fused as Phi-3 stores them."""
    import torch
    from transformers import Phi3Config

    sd, c = llama_model.state_dict(), llama_model.config
    tied = bool(c.tie_word_embeddings)
    out = {}
    for k, v in sd.items():
        if any(p in k for p in ("k_proj", "v_proj", "up_proj")):
            continue
        if "q_proj" in k:
            out[k.replace("q_proj", "qkv_proj")] = torch.cat([v, sd[k.replace("q_", "k_")], sd[k.replace("q_", "v_")]])
        elif "gate_proj" in k:
            out[k.replace("gate_proj", "gate_up_proj")] = torch.cat([v, sd[k.replace("gate_", "up_")]])
        elif k != "lm_head.weight" or not tied:
            out[k] = v.contiguous()
    config = Phi3Config(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
                        num_key_value_heads=c.num_key_value_heads, max_position_embeddings=c.max_position_embeddings,
                        rms_norm_eps=c.rms_norm_eps, pad_token_id=0, tie_word_embeddings=tied)
    return save_tensors(out, config.to_dict(), out_dir, max_shard_size)


def gpt2_conv1d(out_dir, *, seed: int = 0, max_shard_size=None, **dims) -> Path:
    """A GPT-2: c_attn / c_proj / c_fc are `Conv1D`, weights stored [in, out] (`conv1d`)."""
    from transformers import GPT2Config

    return save(random_model(GPT2Config(**{**GPT2, **dims}), seed), out_dir, max_shard_size)


def moe_experts(out_dir, *, model_type: str = "qwen3_moe", per_expert: bool = True, seed: int = 0,
                max_shard_size=None, **dims) -> Path:
    """A mixture of experts (`qwen3_moe` or `mixtral`), its experts saved one 2-D tensor per expert
    (`experts_split`, transformers 5's default for these) or as fused 3-D tensors (`experts_3d`)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(model_type, **{**MOE[model_type], **dims})
    return save(random_model(config, seed), out_dir, max_shard_size, save_original_format=per_expert)


def fp8_block(out_dir, *, seed: int = 0, max_shard_size=None, **dims) -> Path:
    """A Llama written as block-FP8 (every `*_proj` Linear; embeddings and lm_head stay float)."""
    from transformers import LlamaConfig

    return write_fp8(random_model(LlamaConfig(**{**FP8_LLAMA, **dims}), seed), out_dir, max_shard_size)


def mxfp4(out_dir, *, seed: int = 0, max_shard_size=None, **dims) -> Path:
    """A GPT-OSS with its experts in MXFP4 ([E, in, out] parameters, `experts_3d` on blocks/scales)."""
    from transformers import GptOssConfig

    return write_mxfp4(random_model(GptOssConfig(**{**GPT_OSS, **dims}), seed), out_dir, max_shard_size)


def save_tensors(tensors: dict, config: dict, out_dir, max_shard_size=None) -> Path:
    """Write tensors and config.json as a Hugging Face directory, sharded (with an index) when the
    tensors exceed `max_shard_size`."""
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True)
    split = split_torch_state_dict_into_shards(tensors, max_shard_size=max_shard_size or "50GB")
    for filename, keys in split.filename_to_tensors.items():
        save_file({k: tensors[k] for k in keys}, str(out / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": split.metadata, "weight_map": split.tensor_to_filename}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(config))
    return out


# ---- block-scaled FP8 (e4m3, one float32 scale_inv per 128 x 128 block, ceil-padded) ----

def quant_fp8(w, block: int = 128):
    """w [out, in] -> (float8_e4m3fn weight, weight_scale_inv [ceil(out/128), ceil(in/128)] = amax / 448)."""
    import torch

    rows, cols = w.shape
    r, c = -(-rows // block), -(-cols // block)
    padded = torch.zeros(r * block, c * block)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(r, block, c, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(r * block, c * block)[:rows, :cols].contiguous(), scale


def write_fp8(model, out_dir, max_shard_size=None) -> Path:
    """Save `model` as a block-FP8 checkpoint (every `*_proj` Linear), as DeepSeek-V3 / Qwen3-FP8 do."""
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith("_proj.weight"):
            tensors[k], tensors[k + "_scale_inv"] = quant_fp8(v)
        else:
            tensors[k] = v.contiguous()
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    return save_tensors(tensors, config, out_dir, max_shard_size)


# ---- MXFP4 (32 E2M1 values per block, two per byte, low nibble first; one E8M0 scale per block) ----

def quant_mxfp4(w):
    """w [..., out, in] -> (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32])."""
    import torch

    magnitudes = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
    *lead, rows, cols = w.shape
    x = w.float().reshape(*lead, rows, cols // 32, 32)
    amax = x.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    y = (x / torch.exp2(exp)).clamp(-6, 6)
    code = (y.abs().unsqueeze(-1) - magnitudes).abs().argmin(-1) | ((y < 0).long() << 3)
    code = code.to(torch.uint8)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8)


def write_mxfp4(model, out_dir, max_shard_size=None) -> Path:
    """Save a GPT-OSS model with its experts in MXFP4 as the released checkpoints are ([E, out, in] on disk)."""
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # parameter [E, in, out]
            tensors[k + "_blocks"], tensors[k + "_scales"] = quant_mxfp4(v.transpose(1, 2))
        else:
            tensors[k] = v.contiguous()
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    return save_tensors(tensors, config, out_dir, max_shard_size)


# ---- adapters ----

def lora_adapter(config, out_dir, target_modules=(), target_parameters=(), *, r: int = 4, lora_alpha: int = 8,
                 seed: int = 1, **lora_kw) -> Path:
    """A peft LoRA adapter for a model of `config`, A and B drawn under `seed` (init_lora_weights=False:
    a real delta on every targeted module), saved by peft."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors import safe_open

    model = random_model(config)
    torch.manual_seed(seed)
    targets = target_modules if isinstance(target_modules, str) else list(target_modules)  # or "all-linear"
    lora = LoraConfig(r=r, lora_alpha=lora_alpha, target_modules=targets,
                      target_parameters=list(target_parameters) or None, init_lora_weights=False, **lora_kw)
    get_peft_model(model, lora).save_pretrained(out_dir)
    out = Path(out_dir)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        zero = [k for k in f.keys() if "lora_B" in k and not f.get_tensor(k).abs().max() > 0]
    if zero:
        raise RuntimeError(f"{out}: lora_B is all zero in {zero[:3]}: the adapter would make no delta")
    return out


def adapter_config(layout: str, base_dir):
    """The model config an adapter for `layout` is trained on: the base's own (quantization dropped),
    or for `phi3_fused` the Llama whose split modules the Phi-3 fuses."""
    from transformers import AutoConfig, LlamaConfig

    c = json.loads((Path(base_dir) / "config.json").read_text())
    c.pop("quantization_config", None)
    if layout == "phi3_fused":
        keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings")
        return LlamaConfig(**{k: c[k] for k in keys if k in c})
    return AutoConfig.for_model(c.pop("model_type"), **c)


def adapter(layout: str, base_dir, out_dir, target_modules=None, target_parameters=None, **kw) -> Path:
    """A random-nonzero LoRA adapter that merges onto a `layout` base (targets: ADAPTER_TARGETS)."""
    modules, params, extra = ADAPTER_TARGETS[layout]
    return lora_adapter(adapter_config(layout, base_dir), out_dir,
                        modules if target_modules is None else target_modules,
                        params if target_parameters is None else target_parameters, **{**extra, **kw})
