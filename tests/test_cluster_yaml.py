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
