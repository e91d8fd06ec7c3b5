"""The merger on mixture-of-experts and quantized bases, tiny models built from config: 3-D expert
parameters stored per expert or fused, and block-FP8 and MXFP4 checkpoints written by hand (benchmarks/zoo.py,
with quantizers of its own: the checks below do not go through loop/merge/formats.py). Each
merge proves itself with numbers; a wrong expert delta, a dropped delta or a proof that cannot run is
refused, and nothing is left behind."""
import json

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
from transformers.integrations.mxfp4 import convert_moe_packed_tensors

import loop.merge.layouts as layouts
import loop.merge.merger as merger
from loop.config import MergeConfig
from loop.merge.merger import MergeFailed, Merger
from benchmarks import zoo

EXPERT_PARAMS = zoo.EXPERT_PARAMS
IDS = torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(1))


def _adapter(layout, base, path, target_modules=None, target_parameters=None):
    """zoo's LoRA adapter for a `layout` base: random nonzero A and B (peft's init_lora_weights=False)."""
    zoo.adapter(layout, base, path, target_modules, target_parameters)
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

def _per_element(scale, shape, block=128):
    """A per-block scale grid expanded to one value per element of a `shape` weight."""
    return scale.float().repeat_interleave(block, 0)[:shape[0]].repeat_interleave(block, 1)[:, :shape[1]]


def _dequant_fp8(q, scale):
    """The float32 value of a block-FP8 weight."""
    return q.float() * _per_element(scale, q.shape)


# ---- MXFP4 (32 E2M1 values per block, two per byte, low nibble first; one E8M0 scale per block) ----

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
    "qwen3_moe-per_expert": ("qwen3_moe", True, "experts_split", 2 * 4 * 3,  # 4 x gate, up, down
                             "model.layers.1.mlp.experts.3.down_proj.weight"),
    "qwen3_moe-fused": ("qwen3_moe", False, "experts_3d", 2 * 2,  # gate_up_proj, down_proj
                        "model.layers.1.mlp.experts.down_proj"),
    "mixtral-per_expert": ("mixtral", True, "experts_split", 2 * 4 * 3,  # 4 x w1, w3, w2
                           "model.layers.1.block_sparse_moe.experts.3.w2.weight"),
}


@pytest.mark.parametrize("case", MOE_CASES)
def test_moe_expert_parameters(tmp_path, case):
    model_type, per_expert, layout, edits, down_name = MOE_CASES[case]
    base = zoo.moe_experts(tmp_path / "base", model_type=model_type, per_expert=per_expert)
    on_disk = load_file(base / "model.safetensors")
    assert down_name in on_disk and on_disk[down_name].dim() == (2 if per_expert else 3)
    adapter = _adapter("moe_experts", base, tmp_path / "adapter", ["q_proj"], EXPERT_PARAMS)

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
    base = zoo.moe_experts(tmp_path / "base", per_expert=storage == "per_expert")
    adapter = _adapter("moe_experts", base, tmp_path / "adapter", (), EXPERT_PARAMS)
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
    base = zoo.fp8_block(tmp_path / "base")  # zoo.FP8_LLAMA: full and partial 128 x 128 blocks
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    adapter = _adapter("fp8_block", base, tmp_path / "adapter", targets)

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
        assert torch.allclose(scale, zoo.quant_fp8(expected)[1], rtol=1e-5), name
        assert not torch.allclose(scale, before[name + "_scale_inv"]), name
        # e4m3 keeps 3 mantissa bits: within 1/16 of each block's amax (448 / 16 = 28 units of scale_inv).
        err = (_dequant_fp8(q, scale) - expected).abs()
        assert (err <= 28 * _per_element(scale, q.shape) + 1e-7).all(), (name, err.max())
    assert torch.equal(after["lm_head.weight"], before["lm_head.weight"])


def test_fp8_dropped_delta_is_refused(tmp_path, monkeypatch):
    base = zoo.fp8_block(tmp_path / "base")
    adapter = _adapter("fp8_block", base, tmp_path / "adapter", ["q_proj", "v_proj", "down_proj"])
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
    base = zoo.mxfp4(tmp_path / "base")  # zoo.GPT_OSS: 4 experts, [E, in, out] parameters
    adapter = _adapter("mxfp4", base, tmp_path / "adapter", ["q_proj"], EXPERT_PARAMS)

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
    base = zoo.moe_experts(tmp_path / "base", per_expert=False)
    adapter = _adapter("moe_experts", base, tmp_path / "adapter", (), EXPERT_PARAMS)

    def no_kernel(*args, **kwargs):  # as torch's grouped_mm answers float64 MoE experts on CPU
        raise RuntimeError("Expected mat_a to be Float32, BFloat16 or Float16 matrix, got Double")

    monkeypatch.setattr(merger, "reference_logits", no_kernel)
    with pytest.raises(MergeFailed, match="got Double"):
        _merge(base, adapter, tmp_path / "merged")
    _refused_without_writing(tmp_path)


def _legacy_expert_adapter(path, dims, seed=3):
    """A per-expert adapter as transformers v4 models were trained (experts.{e}.gate_proj / up_proj /
    down_proj Linear modules), written by hand: no v5 model has those modules to train it on."""
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, i = dims["hidden_size"], dims["moe_intermediate_size"]
    tensors = {}
    for layer in range(dims["num_hidden_layers"]):
        for e in range(dims["num_experts"]):
            for name, (rows, cols) in {"gate_proj": (i, h), "up_proj": (i, h), "down_proj": (h, i)}.items():
                key = f"base_model.model.model.layers.{layer}.mlp.experts.{e}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(4, cols, generator=g) * 0.3
                tensors[f"{key}.lora_B.weight"] = torch.randn(rows, 4, generator=g) * 0.3
    path.mkdir(parents=True)
    save_file(tensors, str(path / "adapter_model.safetensors"))
    (path / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8,
        "target_modules": ["gate_proj", "up_proj", "down_proj"]}))
    return path


def test_a_per_expert_adapter_onto_fused_experts(tmp_path):
    base = zoo.moe_experts(tmp_path / "base", per_expert=False)
    adapter = _legacy_expert_adapter(tmp_path / "adapter", zoo.QWEN3_MOE)
    report = _merge(base, adapter, tmp_path / "merged")
    # peft converts such an adapter onto the fused experts itself: its forward is the reference.
    assert report.passed and report.max_abs_logit_diff <= 1e-4, report.reasons
    assert report.merged_to_base > 1000 * report.merged_to_reference
    assert report.layouts == {"expert_into_fused": 2 * 4 * 3}
    merged, on_disk = load_file(tmp_path / "merged" / "model.safetensors"), load_file(base / "model.safetensors")
    t = load_file(adapter / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.mlp.experts.2.up_proj"
    delta = 2.0 * t[f"{key}.lora_B.weight"] @ t[f"{key}.lora_A.weight"]  # lora_alpha / r = 2
    i = zoo.QWEN3_MOE["moe_intermediate_size"]
    name = "model.layers.1.mlp.experts.gate_up_proj"
    assert torch.allclose(merged[name][2, i:], on_disk[name][2, i:] + delta, atol=1e-6), "up rows of expert 2"
    assert not torch.equal(merged[name][2, :i], on_disk[name][2, :i]), "gate rows of expert 2 moved too"
