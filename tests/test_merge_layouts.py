"""The merger layout by layout on tiny models built from config: each merge's proofs hold with numbers,
deliberately wrong merges are caught by them, and bad adapters or bases are refused before anything
is written."""
import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig, Phi3Config

import loop.merge.layouts as layouts
from loop.config import MergeConfig
from loop.merge.merger import MergeFailed, Merger
from benchmarks import zoo

DIMS = zoo.LLAMA  # tiny: 2 layers, hidden 32, vocab 96
IDS = torch.randint(1, 96, (3, 12), generator=torch.Generator().manual_seed(1))


def _merge(base, adapter, out, **cfg):
    return Merger(MergeConfig(**cfg)).run(base, adapter, out)


def _logits(model_dir, adapter_dir=None):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    if adapter_dir:
        model = PeftModel.from_pretrained(model, str(adapter_dir)).to(torch.float64).eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _proved(report, layouts_expected):
    assert report.passed and report.finite and not report.reasons
    assert report.max_abs_logit_diff <= 1e-4, report.max_abs_logit_diff
    assert report.merged_to_base > 1000 * report.merged_to_reference, (report.merged_to_base, report.merged_to_reference)
    assert report.layouts == layouts_expected


def test_llama_separate_qkv(tmp_path):
    base = zoo.llama(tmp_path / "base")
    adapter = zoo.adapter("llama", base, tmp_path / "adapter", ["q_proj", "k_proj", "v_proj", "o_proj",
                                                                "gate_proj", "up_proj", "down_proj"])
    report = _merge(base, adapter, tmp_path / "merged")
    _proved(report, {"linear": 14})
    assert torch.allclose(_logits(tmp_path / "merged"), _logits(base, adapter), atol=1e-4)


def test_phi3_adapter_on_the_fused_modules(tmp_path):
    config = Phi3Config(**DIMS, pad_token_id=0)
    base = zoo.save(zoo.random_model(config), tmp_path / "base")
    adapter = zoo.lora_adapter(config, tmp_path / "adapter", ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"])
    _proved(_merge(base, adapter, tmp_path / "merged"), {"linear": 8})


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_split_adapter_onto_phi3_fused_rows(tmp_path, kv_heads):
    # Both from the same Llama config and seed: the Phi-3 holds the Llama's weights, fused.
    phi3 = zoo.phi3_fused(tmp_path / "phi3", num_key_value_heads=kv_heads)
    llama_dir = zoo.llama(tmp_path / "llama", num_key_value_heads=kv_heads, tie_word_embeddings=True)
    assert torch.allclose(_logits(phi3), _logits(llama_dir), atol=1e-10), "the same network in both layouts"
    adapter = zoo.adapter("phi3_fused", phi3, tmp_path / "adapter",
                          ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"])
    report = _merge(phi3, adapter, tmp_path / "merged")
    _proved(report, {"fused_rows": 10})
    # Independently of the merger's own reference: the merged Phi-3 is the Llama with its adapter.
    assert torch.allclose(_logits(tmp_path / "merged"), _logits(llama_dir, adapter), atol=1e-4)


def test_swapped_qkv_split_is_caught(tmp_path, monkeypatch):
    phi3 = zoo.phi3_fused(tmp_path / "phi3")
    adapter = zoo.adapter("phi3_fused", phi3, tmp_path / "adapter", ["q_proj", "k_proj", "v_proj"])
    real = layouts.plan

    def swapped(adapter, base):  # q's delta into k's rows and k's into q's: same shapes, wrong places
        t = {k.replace("q_proj", "TMP").replace("k_proj", "q_proj").replace("TMP", "k_proj"): v
             for k, v in adapter.tensors.items()}
        return real(layouts.Adapter(adapter.path, adapter.config, t), base)

    monkeypatch.setattr(layouts, "plan", swapped)
    with pytest.raises(MergeFailed, match="max \\|merged - reference\\| logit"):
        _merge(phi3, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()
    report = json.loads((tmp_path / "merge_report.json").read_text())
    assert report["passed"] is False and report["max_abs_logit_diff"] > 1e-2


def test_dropped_delta_is_caught(tmp_path, monkeypatch):
    base = zoo.llama(tmp_path / "base")
    adapter = zoo.adapter("llama", base, tmp_path / "adapter", ["q_proj", "v_proj"])
    real = layouts.plan
    monkeypatch.setattr(layouts, "plan", lambda a, b: [layouts.Edit(e.target, e.layout, e.module, lambda w: w)
                                                        for e in real(a, b)])
    with pytest.raises(MergeFailed, match="delta missing"):
        _merge(base, adapter, tmp_path / "merged")


def test_gpt2_conv1d_transposed(tmp_path):
    base = zoo.gpt2_conv1d(tmp_path / "base")  # n_embd 32, vocab 96
    adapter = zoo.adapter("gpt2_conv1d", base, tmp_path / "adapter", ["c_attn", "c_proj", "c_fc"],
                          fan_in_fan_out=True)
    report = _merge(base, adapter, tmp_path / "merged")
    _proved(report, {"conv1d": 8})
    w = load_file(tmp_path / "merged" / "model.safetensors")
    assert w["transformer.h.0.attn.c_attn.weight"].shape == (32, 96), "Conv1D keeps its [in, out] layout"


def test_tied_embeddings_and_an_adapter_on_the_tied_head(tmp_path):
    base = zoo.llama(tmp_path / "base", tie_word_embeddings=True)
    assert "lm_head.weight" not in load_file(base / "model.safetensors")
    adapter = zoo.adapter("llama", base, tmp_path / "adapter", ["embed_tokens", "lm_head", "q_proj"])
    report = _merge(base, adapter, tmp_path / "merged")
    # peft saves the embedding's base weight beside an adapter on it: written back unchanged.
    _proved(report, {"saved_base_weight": 1, "embedding": 1, "untied_head": 1, "linear": 2})
    merged = load_file(tmp_path / "merged" / "model.safetensors")
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["tie_word_embeddings"] is False
    assert not torch.equal(merged["lm_head.weight"], merged["model.embed_tokens.weight"]), "the head is its own"


def test_an_unknown_layout_is_refused_naming_the_module(tmp_path):
    base = zoo.llama(tmp_path / "base")  # separate q/k/v
    adapter = zoo.lora_adapter(Phi3Config(**DIMS, pad_token_id=0), tmp_path / "adapter", ["qkv_proj"])
    with pytest.raises(MergeFailed, match="adapter module model.layers.0.self_attn.qkv_proj: the base has no "
                                          ".*refusing to guess"):
        _merge(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()


def _corrupt(kind, adapter, base):
    """Damage an adapter or base directory the way `kind` says."""
    weights = adapter / "adapter_model.safetensors"
    if kind == "nan":
        t = load_file(weights)
        key = next(k for k in t if "lora_B" in k)
        t[key][0, 0] = float("nan")
        save_file(t, str(weights))
    elif kind == "rank":
        cfg = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**cfg, "r": 8}))
    elif kind == "no_weights":
        weights.unlink()
    elif kind == "no_config":
        (adapter / "adapter_config.json").unlink()
    elif kind == "missing_shard":
        index = json.loads((base / "model.safetensors.index.json").read_text())
        (base / sorted(set(index["weight_map"].values()))[-1]).unlink()


@pytest.mark.parametrize("kind, message", [
    ("nan", "has NaN or Inf values; the training run diverged"),
    ("rank", "has rank 4 but adapter_config.json says r=8"),
    ("no_weights", "no adapter_model.safetensors"),
    ("no_config", "no adapter_config.json: not a peft adapter directory"),
    ("missing_shard", "lists shards that are missing"),
    ("other_base", "the adapter was made for another base model"),
])
def test_bad_adapters_and_bases_are_refused_before_writing(tmp_path, kind, message):
    base = zoo.llama(tmp_path / "base", max_shard_size="20KB")
    assert (base / "model.safetensors.index.json").exists()
    dims = {**DIMS, "hidden_size": 48} if kind == "other_base" else DIMS
    adapter = zoo.lora_adapter(LlamaConfig(**dims), tmp_path / "adapter", ["q_proj", "v_proj"])
    _corrupt(kind, adapter, base)
    with pytest.raises(MergeFailed, match=message):
        _merge(base, adapter, tmp_path / "merged")
    assert not (tmp_path / "merged").exists() and not (tmp_path / "merged.tmp").exists()
    assert json.loads((tmp_path / "merge_report.json").read_text())["reasons"]


def test_a_sharded_base_streams_shard_by_shard(tmp_path):
    base = zoo.llama(tmp_path / "base", max_shard_size="20KB")
    shards = sorted(p.name for p in base.glob("*.safetensors"))
    assert len(shards) > 3
    adapter = zoo.adapter("llama", base, tmp_path / "adapter", ["q_proj", "down_proj"])
    report = _merge(base, adapter, tmp_path / "merged")
    _proved(report, {"linear": 4})
    assert sorted(p.name for p in (tmp_path / "merged").glob("*.safetensors")) == shards
    total_mb = sum((base / s).stat().st_size for s in shards) / 2**20
    assert report.peak_tensor_mb < 0.6 * total_mb, (report.peak_tensor_mb, total_mb)
    index = json.loads((tmp_path / "merged" / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((base / "model.safetensors.index.json").read_text())["weight_map"]


def test_loopctl_merge(tmp_path):
    import subprocess
    import sys

    base = zoo.llama(tmp_path / "base")
    adapter = zoo.adapter("llama", base, tmp_path / "adapter", ["q_proj"])
    cmd = [sys.executable, "-m", "loop.cli", "merge", "--base", str(base), "--out", str(tmp_path / "m" / "merged")]
    ok = subprocess.run(cmd + ["--adapter", str(adapter)], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and json.loads(ok.stdout)["passed"] is True
    assert json.loads(ok.stdout)["engine_note"].startswith("skipped: the base has no tokenizer")
    bad = subprocess.run(cmd + ["--adapter", str(tmp_path / "nowhere")], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and bad.stderr.startswith("error: merge refused: ") and "adapter_config.json" in bad.stderr


def test_dora_rescales_each_row_to_its_magnitude(tmp_path):
    base = zoo.llama(tmp_path / "base")
    adapter = zoo.lora_adapter(LlamaConfig(**DIMS), tmp_path / "adapter", ["q_proj", "down_proj"], use_dora=True)
    weights = adapter / "adapter_model.safetensors"
    t = load_file(weights)
    mags = [k for k in t if "lora_magnitude_vector" in k]
    assert len(mags) == 4
    g = torch.Generator().manual_seed(0)
    for k in mags:  # as trained magnitudes would: no longer the row norms of W + delta peft starts from
        t[k] = t[k] * (1 + 0.3 * torch.randn(t[k].shape, generator=g))
    save_file(t, str(weights))
    report = _merge(base, adapter, tmp_path / "merged")
    _proved(report, {"dora": 4})
    assert torch.allclose(_logits(tmp_path / "merged"), _logits(base, adapter), atol=1e-4)


def test_dora_on_a_fused_row_layout_is_refused(tmp_path):
    phi3 = zoo.phi3_fused(tmp_path / "phi3")
    adapter = zoo.lora_adapter(LlamaConfig(**DIMS), tmp_path / "adapter", ["q_proj"], use_dora=True)
    with pytest.raises(MergeFailed, match="DoRA is merged on plain Linear weights only, not as fused_rows"):
        _merge(phi3, adapter, tmp_path / "merged")
