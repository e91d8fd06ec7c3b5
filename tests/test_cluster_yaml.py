"""cluster.yaml is a launcher file Ray's own schema accepts, with head + GPU worker types."""
from pathlib import Path

import yaml


def test_cluster_yaml_passes_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "cluster.yaml").read_text())
    validate_config(prepare_config(raw))
    types = raw["available_node_types"]
    assert raw["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values()), "a GPU worker type"
    assert all("--dashboard-host=127.0.0.1" in c for c in raw["head_start_ray_commands"] if "--head" in c)


def test_rayservice_manifest_declares_importable_apps_on_a_valid_gpu_config():
    """deploy/rayservice.yaml: Serve's own schema accepts its serveConfigV2, every import path is a
    builder in this repository, and the config it names (configs/<name> copied to the volume) validates."""
    import importlib

    from ray.serve.schema import ServeDeploySchema

    from loop.config import load_config

    root = Path(__file__).resolve().parent.parent
    manifest = yaml.safe_load((root / "deploy" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService" and manifest["apiVersion"] == "ray.io/v1"
    serve_cfg = ServeDeploySchema.model_validate(yaml.safe_load(manifest["spec"]["serveConfigV2"]))
    assert {a.name for a in serve_cfg.applications} == {"student-engine", "gateway"}
    for app in serve_cfg.applications:
        module, _, attr = app.import_path.partition(":")
        assert callable(getattr(importlib.import_module(module), attr)), app.import_path
        cfg = load_config(root / "configs" / Path(app.args["config"]).name)
        assert cfg.training.strategy == "deepspeed" and cfg.training.zero_stage == 3
        assert cfg.serving.engine.num_gpus >= 1 and cfg.ray.address == "auto"
    head = manifest["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]
    assert head["dashboard-host"] == "127.0.0.1"
    workers = manifest["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"])
