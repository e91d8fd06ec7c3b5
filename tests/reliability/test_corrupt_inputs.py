"""A damaged base or draft stops `loopctl serve` (and the loop) before anything starts, with the fix,
and the reason is a failed `preflight` run in MLflow.
Corrupt adapters (NaNs, truncated, another model's shapes, changed after registration) are the
reliability bench's `corrupt_artifacts` scenario, checked in test_reliability.py."""
import shutil
import subprocess
import sys

import pytest
import yaml

from benchmarks.reliability.lifecycle import flip_a_byte
from conftest import ROOT


@pytest.fixture
def fetched(tiny_model_dir, tmp_path):
    """The tiny model as `loopctl models fetch` leaves it: with its manifest and digest."""
    from loop.models.fetch import _finish

    shutil.copytree(tiny_model_dir, tmp_path / "build")
    _finish(tmp_path / "build", tmp_path / "models" / "tiny", name="tiny")
    return tmp_path / "models" / "tiny"


def test_a_damaged_base_is_refused_with_the_fix(fetched, tmp_path):
    from loop.models.fetch import ModelMissing, verify_model

    assert verify_model(fetched)["digest"].startswith("sha256:")
    flip_a_byte(next(fetched.glob("*.safetensors")))
    with pytest.raises(ModelMissing, match="do not match the digest its manifest recorded.*loopctl models fetch"):
        verify_model(fetched)
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path)
    raw["student"]["path"] = raw["draft"]["path"] = str(fetched)
    cfg = tmp_path / "corrupt.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    served = subprocess.run([sys.executable, "-m", "loop.cli", "serve", str(cfg)], capture_output=True, text=True,
                            timeout=120, cwd=ROOT)
    assert served.returncode == 2 and "do not match the digest" in served.stderr, served.stderr[-2000:]
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("continual-loop").experiment_id])
    assert [(r.info.run_name, r.info.status, r.data.tags["verdict"]) for r in runs] == [("preflight", "FAILED", "fail")]
    assert "do not match the digest" in runs[0].data.tags["refused"], "the reason is in MLflow"
    assert not (tmp_path / "traces").exists() and not (tmp_path / "cycles").exists(), "nothing started"
