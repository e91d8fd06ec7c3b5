"""The merger on mixture-of-experts and quantized bases, tiny models built from config: 3-D expert
parameters stored per expert or fused, and block-FP8 and MXFP4 checkpoints written here by hand. Each
merge proves itself with numbers; a wrong expert delta, a dropped delta or a proof that cannot run is
refused, and nothing is left behind."""
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, GptOssConfig, LlamaConfig, MixtralConfig, Qwen3MoeConfig
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import loop.merge.layouts as layouts
import loop.merge.merger as merger
from loop.config import MergeConfig
from loop.merge.merger import MergeFailed, Merger

EXPERT_PARAMS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ATTENTION = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=8, max_position_embeddings=64, initializer_range=0.1)
QWEN3_MOE = dict(**ATTENTION, intermediate_size=48, moe_intermediate_size=12, num_experts=4, num_experts_per_tok=2,
                 decoder_sparse_step=1, mlp_only_layers=[])
MIXTRAL = dict(**ATTENTION, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
# hidden 256 gives 2x2 blocks of 128 in q/o_proj; one kv head of 64 and intermediate 96 give single
# partial blocks (ceil-padded rows in k/v/gate/up, columns in down). transformers' FP8 loader, which the
# merger's reference (peft on the dequantized base) goes through, infers the block size from the scale
# grid: exact only for multiples of 128 or one partial block (it refuses intermediate 320, 3 blocks, and
# silently misreads 200 as 2 blocks of 100), so the dimensions here stay within what it reads exactly.
# Quantized bases keep the default initializer_range 0.02: requantizing base + delta costs a KL that
# grows with the logits' scale (at 0.1 even a correct FP8 merge of this model exceeds 1e-2).
FP8_LLAMA = dict(vocab_size=128, hidden_size=256, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=1, max_position_embeddings=64, tie_word_embeddings=False)
GPT_OSS = dict(vocab_size=128, hidden_size=128, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, head_dim=32, num_local_experts=4, num_experts_per_tok=2,
               layer_types=["sliding_attention", "full_attention"], max_position_embeddings=64)
FP8_MAX = 448.0
FP4_MAGNITUDES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
IDS = torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(1))


def _model(config, seed=0):
    """A model built from config with weights drawn under a fixed seed."""
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def _adapter(config, path, target_modules=(), target_parameters=(), seed=1):
    """A LoRA adapter with random nonzero A and B (peft's init_lora_weights=False), saved by peft."""
    torch.manual_seed(seed)
    peft = get_peft_model(_model(config), LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules),
                                                     target_parameters=list(target_parameters),
                                                     init_lora_weights=False))
    peft.save_pretrained(path)
    tensors = load_file(path / "adapter_model.safetensors")
    assert all(t.abs().max() > 0 for k, t in tensors.items() if "lora_B" in k), "every B is nonzero"
    return path


def _merge(base, adapter, out, **cfg):
    """Run the merger with a MergeConfig built from `cfg`."""
    return Merger(MergeConfig(**cfg)).run(base, adapter, out)


def _logits(model_dir, adapter_dir=None):
    """float64 logits on IDS of a saved model, with a peft adapter on top when given (unmerged)."""
    # grouped_mm (transformers' default experts kernel) has no float64 CPU kernel: eager experts.
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64, experts_implementation="eager").eval()
    if adapter_dir:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _refused_without_writing(tmp_path):
    """After a refused merge: no merged or temporary directory, a report that says passed false."""
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()
    report = json.loads((tmp_path / "merge_report.json").read_text())
    assert report["passed"] is False and report["reasons"]
    return report


def _lora_delta(adapter_dir, module, scaling=2.0):
    """s B @ A of one Linear module of a saved adapter (lora_alpha 8 / r 4)."""
    t = load_file(adapter_dir / "adapter_model.safetensors")
    key = f"base_model.model.{module}"
    return scaling * t[f"{key}.lora_B.weight"].float() @ t[f"{key}.lora_A.weight"].float()


# ---- block-scaled FP8 (e4m3, one float32 scale_inv per 128 x 128 block, ceil-padded) ----

def _quant_fp8(w, block=128):
    """w [out, in] -> (float8_e4m3fn weight, weight_scale_inv [ceil(out/128), ceil(in/128)] = amax / 448)."""
    rows, cols = w.shape
    r, c = -(-rows // block), -(-cols // block)
    padded = torch.zeros(r * block, c * block)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(r, block, c, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(r * block, c * block)[:rows, :cols].contiguous(), scale


def _per_element(scale, shape, block=128):
    """A per-block scale grid expanded to one value per element of a `shape` weight."""
    return scale.float().repeat_interleave(block, 0)[:shape[0]].repeat_interleave(block, 1)[:, :shape[1]]


def _dequant_fp8(q, scale):
    """The float32 value of a block-FP8 weight."""
    return q.float() * _per_element(scale, q.shape)


def _write_fp8(model, path):
    """Save `model` as a block-FP8 checkpoint (every Linear but lm_head), as DeepSeek-V3 / Qwen3-FP8 do."""
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith("_proj.weight"):
            tensors[k], tensors[k + "_scale_inv"] = _quant_fp8(v)
        else:
            tensors[k] = v.contiguous()
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic",
                                     "weight_block_size": [128, 128], "modules_to_not_convert": ["lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


# ---- MXFP4 (32 E2M1 values per block, two per byte, low nibble first; one E8M0 scale per block) ----

def _quant_mxfp4(w):
    """w [..., out, in] -> (blocks uint8 [..., out, in/32, 16], scales uint8 [..., out, in/32])."""
    *lead, rows, cols = w.shape
    x = w.float().reshape(*lead, rows, cols // 32, 32)
    amax = x.abs().amax(-1, keepdim=True)
    exp = torch.where(amax > 0, torch.floor(torch.log2(amax)) - 2, torch.full_like(amax, -127)).clamp(-127, 127)
    y = (x / torch.exp2(exp)).clamp(-6, 6)
    code = (y.abs().unsqueeze(-1) - FP4_MAGNITUDES).abs().argmin(-1) | ((y < 0).long() << 3)
    code = code.to(torch.uint8)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).contiguous(), (exp.squeeze(-1) + 127).to(torch.uint8)


def _write_mxfp4(model, path):
    """Save a GPT-OSS model with its experts in MXFP4 as the released checkpoints are ([E, out, in] on disk)."""
    tensors = {}
    for k, v in model.state_dict().items():
        if k.endswith(("experts.gate_up_proj", "experts.down_proj")):  # parameter [E, in, out]
            tensors[k + "_blocks"], tensors[k + "_scales"] = _quant_mxfp4(v.transpose(1, 2))
        else:
            tensors[k] = v.contiguous()
    path.mkdir()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (path / "config.json").write_text(json.dumps(config))
    return path


def _expert_delta(adapter_dir, module, experts, transposed=False, scaling=2.0):
    """Per-expert s B_e @ A_e of a peft ParamWrapper (A rows expert-major, B columns rank-major)."""
    t = load_file(adapter_dir / "adapter_model.safetensors")
    a, b = t[f"base_model.model.{module}.lora_A.weight"], t[f"base_model.model.{module}.lora_B.weight"]
    r = a.shape[0] // experts
    d = scaling * (b.reshape(b.shape[0], r, experts).permute(2, 0, 1) @ a.reshape(experts, r, -1))
    return d.transpose(1, 2) if transposed else d


# ---- mixture of experts: peft target_parameters on 3-D expert parameters ----

# model, saved per expert (transformers 5's default for these) or fused, layout, edits, one expert's down_proj
MOE_CASES = {
    "qwen3_moe-per_expert": (Qwen3MoeConfig, QWEN3_MOE, True, "experts_split", 2 * 4 * 3,  # 4 x gate, up, down
                             "model.layers.1.mlp.experts.3.down_proj.weight"),
    "qwen3_moe-fused": (Qwen3MoeConfig, QWEN3_MOE, False, "experts_3d", 2 * 2,  # gate_up_proj, down_proj
                        "model.layers.1.mlp.experts.down_proj"),
    "mixtral-per_expert": (MixtralConfig, MIXTRAL, True, "experts_split", 2 * 4 * 3,  # 4 x w1, w3, w2
                           "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_expert_parameters(tmp_path, case):
    config_cls, dims, per_expert, layout, edits, down_name = MOE_CASES[case]
    config = config_cls(**dims)
    base = tmp_path / "base"
    _model(config).save_pretrained(base, save_original_format=per_expert)
    on_disk = load_file(base / "model.safetensors")
    assert down_name in on_disk and on_disk[down_name].dim() == (2 if per_expert else 3)
    adapter = _adapter(config, tmp_path / "adapter", ["q_proj"], EXPERT_PARAMS)

    report = _merge(base, adapter, tmp_path / "merged")
    assert report.passed and report.finite and not report.reasons
    assert report.max_abs_logit_diff <= 1e-4, report.max_abs_logit_diff
    assert report.merged_to_base > 1000 * report.merged_to_reference, \
        (report.merged_to_base, report.merged_to_reference)
    assert report.layouts == {layout: edits, "linear": 2}
    assert report.tensors_changed == edits + 2
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert {k: v.shape for k, v in merged.items()} == {k: v.shape for k, v in on_disk.items()}
    # Independently of the merger's own proof: the merged directory is a plain model equal to base + adapter.
    reference = _logits(base, adapter)
    assert (_logits(tmp_path / "merged") - reference).abs().max() < 1e-4
    assert (_logits(base) - reference).abs().max() > 0.1, "the adapter changes the logits"
    # One down_proj moved by exactly its own delta (expert 3's when stored per expert).
    down = _expert_delta(adapter, "model.layers.1.mlp.experts", 4)  # the outer ParamWrapper: the last target
    expected = on_disk[down_name] + (down[3] if per_expert else down)
    assert torch.allclose(merged[down_name], expected, atol=1e-6)


@pytest.mark.parametrize("storage", ["per_expert", "fused"])
def test_one_delta_for_all_experts_is_caught(tmp_path, monkeypatch, storage):
    config = Qwen3MoeConfig(**QWEN3_MOE)
    base = tmp_path / "base"
    _model(config).save_pretrained(base, save_original_format=storage == "per_expert")
    adapter = _adapter(config, tmp_path / "adapter", (), EXPERT_PARAMS)
    real = layouts._delta_3d

    def shared(a, b, experts, s, transposed):  # every expert gets the experts' mean delta: same shapes
        return real(a, b, experts, s, transposed).mean(0, keepdim=True).expand(experts, -1, -1)

    monkeypatch.setattr(layouts, "_delta_3d", shared)
    with pytest.raises(MergeFailed, match=r"max \|merged - reference\| logit"):
        _merge(base, adapter, tmp_path / "merged")
    report = _refused_without_writing(tmp_path)
    assert report["max_abs_logit_diff"] > 1e-2, report["max_abs_logit_diff"]


# ---- block-scaled FP8 base ----

def test_fp8_block_base(tmp_path):
    config = LlamaConfig(**FP8_LLAMA)
    base = _write_fp8(_model(config), tmp_path / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = _adapter(config, tmp_path / "adapter", targets)

    report = _merge(base, adapter, tmp_path / "merged")
    assert report.passed and report.finite and not report.reasons
    assert report.quantized == "fp8"
    assert report.layouts == {"linear": 14} and report.tensors_changed == 14
    assert report.kl_to_reference < MergeConfig().max_kl_quantized, report.kl_to_reference
    assert report.merged_to_base > 5 * report.merged_to_reference, (report.merged_to_base, report.merged_to_reference)

    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert after.keys() == before.keys()
    for name in [k for k in before if k.endswith("_proj.weight")]:  # every targeted Linear, all in FP8
        q, scale = after[name], after[name + "_scale_inv"]
        assert q.dtype == torch.float8_e4m3fn and q.shape == before[name].shape
        assert scale.dtype == torch.float32 and scale.shape == before[name + "_scale_inv"].shape
        # Fresh scales: requantized from base + delta (amax / 448 per block), not the base's scales kept.
        expected = _dequant_fp8(before[name], before[name + "_scale_inv"]) + _lora_delta(adapter, name[:-7])
        assert torch.allclose(scale, _quant_fp8(expected)[1], rtol=1e-5), name
        assert not torch.allclose(scale, before[name + "_scale_inv"]), name
        # e4m3 keeps 3 mantissa bits: within 1/16 of each block's amax (448 / 16 = 28 units of scale_inv).
        err = (_dequant_fp8(q, scale) - expected).abs()
        assert (err <= 28 * _per_element(scale, q.shape) + 1e-7).all(), (name, err.max())
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])


def test_fp8_dropped_delta_is_refused(tmp_path, monkeypatch):
    config = LlamaConfig(**FP8_LLAMA)
    base = _write_fp8(_model(config), tmp_path / "base")
    adapter = _adapter(config, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
    real = layouts.plan
    monkeypatch.setattr(layouts, "plan", lambda a, b: [layouts.Edit(e.target, e.layout, e.module, lambda w: w)
                                                        for e in real(a, b)])
    with pytest.raises(MergeFailed, match="delta missing"):
        _merge(base, adapter, tmp_path / "merged")
    report = _refused_without_writing(tmp_path)
    assert report["quantized"] == "fp8"
    assert report["merged_to_base"] < 1e-6 < report["merged_to_reference"], "requantizing the base alone is exact"


# ---- MXFP4 base (GPT-OSS: experts [E, in, out], stored as blocks and scales) ----

def test_mxfp4_gpt_oss_experts(tmp_path):
    config = GptOssConfig(**GPT_OSS)
    base = _write_mxfp4(_model(config), tmp_path / "base")
    adapter = _adapter(config, tmp_path / "adapter", ["q_proj"], EXPERT_PARAMS)

    report = _merge(base, adapter, tmp_path / "merged")
    assert report.passed and report.finite and not report.reasons
    assert report.quantized == "mxfp4"
    assert report.layouts == {"experts_3d": 4, "linear": 2} and report.tensors_changed == 6
    assert report.kl_to_reference < MergeConfig().max_kl_quantized, report.kl_to_reference
    # FP4 keeps one mantissa bit: the requantized experts sit much nearer base + delta than the base, not on it.
    assert report.merged_to_base > 2 * report.merged_to_reference, (report.merged_to_base, report.merged_to_reference)

    before, after = load_file(base / "model.safetensors"), load_file(tmp_path / "merged" / "model.safetensors")
    assert after.keys() == before.keys()
    for layer in range(2):
        owner = f"model.layers.{layer}.mlp.experts"
        for param, d in (("down_proj", _expert_delta(adapter, owner, 4, transposed=True)),
                         ("gate_up_proj", _expert_delta(adapter, owner + ".base_layer", 4, transposed=True))):
            blocks, scales = after[f"{owner}.{param}_blocks"], after[f"{owner}.{param}_scales"]
            assert blocks.dtype == scales.dtype == torch.uint8
            assert blocks.shape == before[f"{owner}.{param}_blocks"].shape
            assert not torch.equal(scales, before[f"{owner}.{param}_scales"]), "fresh shared scales"
            # transformers' own MXFP4 decoder reads the merged experts as [E, in, out].
            value = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
            base_value = convert_moe_packed_tensors(before[f"{owner}.{param}_blocks"],
                                                    before[f"{owner}.{param}_scales"], dtype=torch.float32)
            expected = base_value + d
            # E2M1 with a power-of-two scale 2^e per 32 values: each value within 2^(e+1).
            bound = torch.exp2(scales.float() - 126).repeat_interleave(32, -1).transpose(1, 2)
            assert ((value - expected).abs() <= bound).all(), (owner, param)
            assert (value - expected).norm() < 0.5 * (value - base_value).norm(), "the delta is there"


# ---- a proof that cannot run ----

def test_a_proof_that_cannot_run_is_a_refusal(tmp_path, monkeypatch):
    config = Qwen3MoeConfig(**QWEN3_MOE)
    base = tmp_path / "base"
    _model(config).save_pretrained(base, save_original_format=False)
    adapter = _adapter(config, tmp_path / "adapter", (), EXPERT_PARAMS)

    def no_kernel(*args, **kwargs):  # as torch's grouped_mm answers float64 MoE experts on CPU
        raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")

    monkeypatch.setattr(merger, "reference_logits", no_kernel)
    with pytest.raises(MergeFailed, match="got Double"):
        _merge(base, adapter, tmp_path / "merged")
    _refused_without_writing(tmp_path)
