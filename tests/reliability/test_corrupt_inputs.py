"""Corrupt adapters and bases are refused before anything serves them, with the reason recorded: a
damaged base or draft stops `loopctl serve` and the loop before they start; an adapter of NaNs, a
truncated one, or one whose shapes fit another model fails the merge stage's proofs, the verdict and
reasons land in MLflow, and no model version is registered."""
import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT


@pytest.fixture
def fetched(tiny_model_dir, tmp_path):
    """The tiny model as `loopctl models fetch` leaves it: with its manifest and digest."""
    from loop.models.fetch import _finish

    shutil.copytree(tiny_model_dir, tmp_path / "build")
    _finish(tmp_path / "build", tmp_path / "models" / "tiny", name="tiny")
    return tmp_path / "models" / "tiny"


def _flip_a_byte(model_dir):
    f = next(model_dir.glob("*.safetensors"))
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))


def test_a_damaged_base_is_refused_with_the_fix(fetched, tmp_path):
    from loop.models.fetch import ModelMissing, verify_model

    assert verify_model(fetched)["digest"].startswith("sha256:")
    _flip_a_byte(fetched)
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
    assert not (tmp_path / "mlflow.db").exists(), "nothing started, nothing written"


def _adapter(base, out, how):
    from safetensors.torch import load_file, save_file

    from benchmarks.serving import make_adapter

    make_adapter(base, out, 8, seed=3, std=0.05)
    f = out / "adapter_model.safetensors"
    if how == "nan":
        tensors = load_file(f)
        name = next(k for k in tensors if "lora_B" in k)
        tensors[name][:] = float("nan")
        save_file(tensors, f)
    elif how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif how == "other-model":
        tensors = load_file(f)
        save_file({k: v.repeat(1, 2) if "lora_A" in k else v for k, v in tensors.items()}, f)
    return out


@pytest.mark.cluster
@pytest.mark.parametrize("how", ["nan", "truncated", "other-model"])
def test_a_corrupt_adapter_fails_the_merge_with_its_reason_in_mlflow(ray_cluster, fetched, tmp_path, how):
    import ray

    from loop.config import LoopConfig
    from loop.cycle import Cycle
    from loop.lineage.registry import Lineage

    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path / "state")
    raw["student"]["path"] = str(fetched)
    cfg = LoopConfig.model_validate(raw)
    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace=cfg.ray.namespace, ignore_reinit_error=True)
    lineage = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
    endpoint = cfg.tenants[0].endpoints[0]
    from loop.models.fetch import read_manifest

    lineage.ensure_base_version(endpoint.id, fetched, read_manifest(fetched))
    cycle = Cycle(cfg, SimpleNamespace(lineage=lineage), endpoint, 1, "unused", progress=lambda m: None)
    cycle.report.run_id = lineage.start_run("corrupt-adapter")
    adapter = _adapter(fetched, tmp_path / f"adapter-{how}", how)
    result = cycle.stage("merge", lambda d, r: cycle._merge(d, r, {"adapter_dir": str(adapter)}))
    assert result["passed"] is False and result["reasons"], result
    runs = lineage.client.search_runs([lineage.experiment_id], "tags.`loop.stage` = 'merge'")
    assert len(runs) == 1 and runs[0].data.tags["verdict"] == "fail"
    logged = json.loads((cycle.dir / "merge" / "merge_report.json").read_text())
    recorded = lineage.client.download_artifacts(runs[0].info.run_id, "merge_report.json", str(tmp_path))
    assert json.loads(open(recorded).read())["reasons"] == logged["reasons"] == result["reasons"]
    assert lineage.versions(endpoint.id) == [1], "nothing registered"
    assert not (cycle.dir / "merge" / "merged" / "model.safetensors").exists(), "no merged model left to serve"
