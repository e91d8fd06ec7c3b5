"""Model directories: tiny models from config, the initial draft, digests and manifests."""
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from loop.config import load_config
from loop.models.digest import dir_digest
from loop.models.fetch import ModelMissing, ensure_models, read_manifest


def _cfg(tmp_path, **student):
    raw = yaml.safe_load(open("configs/tiny.yaml"))
    raw["storage"]["root"] = str(tmp_path)
    raw["student"].update(student)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return load_config(p)


def test_tiny_student_and_draft(tmp_path):
    cfg = _cfg(tmp_path)
    out = ensure_models(cfg)
    s_dir, d_dir = cfg.model_path(cfg.student), cfg.model_path(cfg.draft)
    assert out["student"]["digest"] == dir_digest(s_dir) and out["draft"]["student_digest"] == out["student"]["digest"]
    student, draft = AutoModelForCausalLM.from_pretrained(s_dir), AutoModelForCausalLM.from_pretrained(d_dir)
    assert student.config.num_hidden_layers == 2 and student.config.hidden_size == 64
    assert draft.config.num_hidden_layers == 1
    assert AutoTokenizer.from_pretrained(d_dir).get_vocab() == AutoTokenizer.from_pretrained(s_dir).get_vocab()
    # The draft is the student's first layer, embedding and head, copied exactly.
    assert torch.equal(draft.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(draft.lm_head.weight, student.lm_head.weight)
    assert 0 < out["draft"]["parameter_ratio"] < 1
    # Second call: nothing rebuilt, same digests.
    assert ensure_models(cfg) == out


def test_missing_local_model_names_the_fix(tmp_path):
    cfg = _cfg(tmp_path, source="local")
    with pytest.raises(ModelMissing, match="student.path .* has no model"):
        ensure_models(cfg)
    with pytest.raises(ModelMissing, match="loopctl models fetch"):
        read_manifest(tmp_path / "nothing-here")


def test_incomplete_model_dir_is_rebuilt(tmp_path):
    cfg = _cfg(tmp_path)
    d = cfg.model_path(cfg.student)
    d.mkdir(parents=True)
    (d / "config.json").write_text("{half written")  # a crash before the manifest
    out = ensure_models(cfg)
    assert out["student"]["digest"] == dir_digest(d)
