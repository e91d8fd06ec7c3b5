"""Shared fixtures: tiny models built from config (no downloads) and one Ray cluster per session.

The cluster is a real `ray start --head` (token auth on, as Ray 2.60 makes it), so the same cluster
serves the `ray job submit` test, the full-cycle test and the Serve tests: one vLLM engine start.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

# Ray 2.60 turns token authentication on for new clusters; a client must say so before Ray reads
# its auth settings (they are cached on first use), so it is set before any test imports Ray.
os.environ["RAY_AUTH_MODE"] = "token"

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from loop.models.tiny import build_tiny_model
    from loop.sim.world import World

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", World(3, 0, 8).corpus())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_config_path(tmp_path_factory) -> Path:
    """configs/tiny.yaml with its state under a temp dir and its own Serve port."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    state = tmp_path_factory.mktemp("state")
    raw["storage"]["root"] = str(state)
    raw["serving"]["port"] = _free_port()
    # Both endpoints serve adapters: the cycle-1 job checks serving parity on the multi-LoRA engine
    # only; test_resume's cycle starts the one engine on merged weights (~50 s a start on CPU).
    raw["validation"]["merged_parity"] = "auto"
    path = state / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A real local Ray cluster (`ray start --head`), token authentication on; yields its env."""
    # The venv's bin first on PATH: job entrypoints (`python jobs/run_loop.py`) run in its Python.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    port, dash = _free_port(), _free_port()
    temp = Path("/tmp/loop-ray-test")
    shutil.rmtree(temp, ignore_errors=True)
    subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True)
    _kill_orphaned_engines()
    # `ray start` with token auth needs a token and makes none: on a fresh machine (no
    # ~/.ray/auth_token yet) one is made first, as `ray.init()` does for itself.
    subprocess.run([BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    subprocess.run([BIN / "ray", "start", "--head", "--port", str(port), "--num-cpus", "6",
                    "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                    "--disable-usage-stats", "--temp-dir", str(temp)],
                   env=env, check=True, capture_output=True)
    env["RAY_ADDRESS"] = f"127.0.0.1:{port}"
    env["LOOP_DASHBOARD"] = f"http://127.0.0.1:{dash}"
    yield env
    # Stop Serve gracefully first so vLLM engines shut their worker processes down, then Ray.
    subprocess.run([sys.executable, "-c", "import ray; from ray import serve; ray.init(); serve.shutdown()"],
                   env=env, capture_output=True, timeout=120)
    subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True)
    _kill_orphaned_engines()


def _kill_orphaned_engines() -> None:
    from loop.serving.engine import kill_orphaned_engines

    kill_orphaned_engines()


@pytest.fixture(scope="session")
def cycle_job(ray_cluster, tiny_config_path):
    """Fetch the tiny models, then run one cycle through `ray job submit` and wait for it."""
    keys = {"LOOP_DEMO_API_KEY": "sk-loop-demo-acme", "LOOP_DEMO_GLOBEX_KEY": "sk-loop-demo-globex"}
    env = dict(ray_cluster, **keys)
    subprocess.run([sys.executable, "-m", "loop.cli", "models", "fetch", "--config", str(tiny_config_path)],
                   env=env, check=True, cwd=ROOT)
    report = tiny_config_path.parent / "reports.json"
    started = time.time()
    proc = subprocess.run(
        [BIN / "ray", "job", "submit", "--address", env["LOOP_DASHBOARD"], "--working-dir", str(ROOT),
         "--runtime-env-json", json.dumps({"env_vars": keys}),
         "--", "python", "jobs/run_loop.py", "--config", str(tiny_config_path), "--cycles", "1",
         "--report-json", str(report)],
        env=env, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    return {"proc": proc, "env": env, "report": report, "config": tiny_config_path,
            "seconds": time.time() - started}


def pytest_collection_modifyitems(config, items):
    """Tests marked `last` (they move the shared loop on to its next cycle) run after every other, and
    the reliability suite (it replaces the cluster's gateway and kills its parts) after those."""
    items.sort(key=lambda item: 2 if item.get_closest_marker("reliability") else
               1 if item.get_closest_marker("last") else 0)
