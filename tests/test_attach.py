"""Serving never stops for learning: a `loopctl run` beside a running `loopctl serve` joins its Ray
cluster (the server's serving.json names it) and leaves its Serve apps up when it ends."""
import json
import os
import subprocess
import sys

import pytest
import yaml

from loop.config import load_config
from loop.cluster import announce_serving, running_server, serving_file, withdraw_serving

pytestmark = pytest.mark.cluster

JOIN = """
import json, sys
from loop.config import load_config
from loop.cluster import init_ray, joined_server, stop_services
cfg = load_config(sys.argv[1])
init_ray(cfg)
import ray
print(json.dumps({"gcs": ray.get_runtime_context().gcs_address, "joined": joined_server()}))
stop_services(cfg)
"""


@pytest.fixture
def root_config(tmp_path, tiny_config_path):
    raw = yaml.safe_load(tiny_config_path.read_text())
    raw["storage"]["root"] = str(tmp_path / "state")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_server_file_names_a_live_server_only(root_config):
    cfg = load_config(root_config)
    assert running_server(cfg) is None, "no server yet"
    serving_file(cfg).parent.mkdir(parents=True)
    serving_file(cfg).write_text(json.dumps({"address": "127.0.0.1:1", "pid": 2 ** 22 + 7}))
    assert running_server(cfg) is None, "a file whose process is gone (a crash) names no server"
    serving_file(cfg).write_text("{not json")
    assert running_server(cfg) is None


def test_run_beside_serve_joins_its_cluster_and_leaves_serving_up(ray_cluster, cycle_job, root_config):
    import ray
    from ray import serve

    from loop.cluster import GATEWAY_APP

    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    cfg = load_config(root_config)
    announce_serving(cfg, "http://127.0.0.1:1/v1")  # as `loopctl serve` does, from this (live) process
    assert running_server(cfg)["pid"] == os.getpid()
    env = {k: v for k, v in ray_cluster.items() if k != "RAY_ADDRESS"}  # the embedded default: no cluster named
    out = subprocess.run([sys.executable, "-c", JOIN, str(root_config)], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["gcs"] == ray.get_runtime_context().gcs_address, "it joined the server's cluster"
    assert seen["joined"]["pid"] == os.getpid()
    assert "attached to the running `loopctl serve`" in out.stdout + out.stderr
    assert serve.status().applications[GATEWAY_APP].status == "RUNNING", "its end left the gateway up"
    withdraw_serving(cfg)
    assert not serving_file(cfg).exists()
