"""A bad config, a missing model or an unreachable teacher: one line naming the fix, exit 2, and
nothing started or written (no MLflow database, no trace log, no cycle directory)."""
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def _run(config: Path, env_extra=None):
    import os

    env = dict(os.environ, LOOP_DEMO_API_KEY="k", LOOP_DEMO_GLOBEX_KEY="k", **(env_extra or {}))
    return subprocess.run([sys.executable, str(ROOT / "jobs" / "run_loop.py"), "--config", str(config)],
                          capture_output=True, text=True, env=env, timeout=120)


def _config(tmp_path, mutate=lambda r: None) -> Path:
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path / "state")
    mutate(raw)
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def _nothing_written(tmp_path):
    state = tmp_path / "state"
    assert not (state / "mlflow.db").exists() and not (state / "traces").exists() and not (state / "cycles").exists()


def test_bad_config(tmp_path):
    out = _run(_config(tmp_path, lambda r: r["training"].update(max_steps="many")))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'c.yaml'}: training.max_steps: Input should be a valid integer, unable to parse string as an integer"]
    _nothing_written(tmp_path)


def test_missing_model(tmp_path):
    out = _run(_config(tmp_path))
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "run `loopctl models fetch --config CONFIG`" in lines[0]
    _nothing_written(tmp_path)


def test_unreachable_teacher(tmp_path):
    from loop.config import load_config
    from loop.models.fetch import ensure_models

    cfg_path = _config(tmp_path, lambda r: r.update(teacher={"kind": "openai", "base_url": "http://127.0.0.1:9/v1",
                                                             "model": "frontier", "timeout_s": 2}))
    ensure_models(load_config(cfg_path))
    out = _run(cfg_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "teacher at http://127.0.0.1:9/v1 is unreachable" in lines[0]
    assert "teacher.base_url" in lines[0]
    _nothing_written(tmp_path)


def test_local_teacher_missing_or_with_another_tokenizer(tmp_path):
    from loop.config import load_config
    from loop.models.fetch import ensure_models
    from loop.models.tiny import build_tiny_model

    def local(raw):
        raw.update(teacher={"kind": "local", "path": "models/teacher"})
        for tenant in raw["tenants"]:
            for endpoint in tenant["endpoints"]:
                endpoint.pop("cascade", None)

    cfg_path = _config(tmp_path, local)
    ensure_models(load_config(cfg_path))
    out = _run(cfg_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "teacher.path: " in out.stderr and "holds no Hugging Face model" in out.stderr
    build_tiny_model(tmp_path / "state" / "models" / "teacher", ["another corpus", "another vocabulary"])
    out = _run(cfg_path)
    assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1
    assert "a local teacher must share the student's tokenizer" in out.stderr
    _nothing_written(tmp_path)


def test_missing_simulated_user_key(tmp_path):
    import os

    env = {k: v for k, v in os.environ.items() if k not in ("LOOP_DEMO_API_KEY", "LOOP_DEMO_GLOBEX_KEY")}
    out = subprocess.run([sys.executable, str(ROOT / "jobs" / "run_loop.py"), "--config", str(_config(tmp_path))],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "tenants[0].sim_api_key_env" in out.stderr
    _nothing_written(tmp_path)
