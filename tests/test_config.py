"""Every config under configs/ loads; bad configs fail with messages that name the field."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pydantic import ValidationError

from benchmarks.reliability.lifecycle import BAD_CONFIGS
from loop.config import ConfigError, LoopConfig, hash_api_key, load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "tiny.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.endpoints(), "a config serves at least one endpoint"
    for tenant in cfg.tenants:
        assert all(h.startswith("sha256:") for h in tenant.api_key_hashes)


def _write(tmp_path, mutate):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    mutate(raw)
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


@pytest.mark.parametrize("mutate, expected", [c[1:] for c in BAD_CONFIGS], ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_names_the_field(tmp_path, mutate, expected):
    with pytest.raises(ConfigError) as e:
        load_config(_write(tmp_path, mutate))
    assert expected in str(e.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "x.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_loopctl_config_check_exit_codes(tmp_path):
    ok = subprocess.run([sys.executable, "-m", "loop.cli", "config", "check", str(ROOT / "configs" / "demo.yaml")],
                        capture_output=True, text=True)
    assert ok.returncode == 0 and "ok" in ok.stdout
    bad = _write(tmp_path, lambda r: r["training"].update(batch_size=0))
    out = subprocess.run([sys.executable, "-m", "loop.cli", "config", "check", str(bad)], capture_output=True, text=True)
    assert out.returncode == 1
    assert "training.batch_size" in out.stderr and "greater than or equal to 1" in out.stderr


def test_key_hash_is_stable_and_not_plaintext():
    h = hash_api_key("sk-secret")
    assert h == hash_api_key("sk-secret") and h.startswith("sha256:") and "sk-secret" not in h
    assert len(h) == len("sha256:") + 64


def test_real_traffic_needs_a_real_teacher():
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["traffic"]["simulate"] = False
    with pytest.raises(ValidationError, match="teacher.kind 'reference' is the simulated world's teacher"):
        LoopConfig.model_validate(raw)
    raw["teacher"] = {"kind": "openai", "base_url": "https://api.example.com/v1", "model": "frontier"}
    raw.pop("world")  # the demo's section: refused in a real config (tests/test_seam.py)
    assert LoopConfig.model_validate(raw).traffic.simulate is False
