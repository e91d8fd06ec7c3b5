"""`loopctl` acts on the config in use (--config or $LOOP_CONFIG), never silently on the demo's; and
`loopctl lineage` names what the gate's score measured (no Ray, no MLflow, no models)."""
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from loop import cli
from loop.cli import main
from loop.lineage.chain import render, validation_measure

ROOT = Path(__file__).resolve().parent.parent
NO_CONFIG = "error: no config: pass --config CONFIG or set LOOP_CONFIG=CONFIG\n"


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    for name in ("LOOP_CONFIG", "LOOP_STORAGE_ROOT", "LOOP_ADMIN_KEY"):
        monkeypatch.delenv(name, raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def config(tmp_path) -> str:
    """configs/tiny.yaml with its state in tmp_path and a port where no gateway listens."""
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path / "state")
    raw["serving"]["port"] = _free_port()
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.mark.parametrize("argv", [["lineage", "model-tiny-support"], ["status"], ["promote", "model-tiny-support"],
                                  ["rollback", "model-tiny-support"], ["traces", "show"]])
def test_without_a_config_it_refuses_in_one_line(argv, capsys, monkeypatch):
    monkeypatch.setenv("LOOP_ADMIN_KEY", "sk-admin")  # the config is what is missing, not the key
    assert main(argv) == 2
    assert capsys.readouterr().err == NO_CONFIG


def test_lineage_reads_the_config_from_the_environment(config, capsys, monkeypatch):
    monkeypatch.setenv("LOOP_CONFIG", config)
    assert main(["lineage", "model-nope"]) == 2  # the endpoint check needs the config, not MLflow
    assert "model-nope is not an endpoint of tiny" in capsys.readouterr().err


def test_admin_commands_find_the_gateway_from_the_config_in_use(config, capsys, monkeypatch):
    monkeypatch.setenv("LOOP_ADMIN_KEY", "sk-admin")
    port = yaml.safe_load(Path(config).read_text())["serving"]["port"]
    monkeypatch.setenv("LOOP_CONFIG", config)
    assert main(["status"]) == 2
    assert f"no gateway at http://127.0.0.1:{port}" in capsys.readouterr().err
    monkeypatch.setenv("LOOP_CONFIG", "/nowhere/loop.yaml")  # --config wins over the environment
    assert main(["promote", "model-tiny-support", "--config", config]) == 2
    assert f"no gateway at http://127.0.0.1:{port}" in capsys.readouterr().err
    assert main(["rollback", "model-tiny-support"]) == 2
    assert "/nowhere/loop.yaml: no such config file" in capsys.readouterr().err


def test_a_gateway_url_needs_no_config(capsys):
    assert main(["status", "--url", f"http://127.0.0.1:{_free_port()}"]) == 2
    assert "LOOP_ADMIN_KEY" in capsys.readouterr().err, "it got past the config to the admin key"


def test_models_fetch_and_bench_keep_the_demo_default(monkeypatch):
    args = SimpleNamespace(config=None)
    assert cli._config_or_demo(args) == "configs/demo.yaml"
    monkeypatch.setenv("LOOP_CONFIG", "configs/tiny.yaml")
    assert cli._config_or_demo(args) == "configs/tiny.yaml"
    assert cli._config_or_demo(SimpleNamespace(config="x.yaml")) == "x.yaml"


def _report(**kw):
    nan = float("nan")
    return {"candidate_acc": 0.61, "champion_acc": 0.4, "num_questions": 12, "teacher_agreement": nan,
            "champion_teacher_agreement": nan, "num_agreement": 0, **kw}


def test_the_gate_score_is_named_for_what_it_measured():
    heldout = {"heldout-teacher": {"kind": "skill", "num_items": 12}, "base-regression": {"kind": "regression"}}
    assert validation_measure(_report(suites=heldout, teacher_agreement=0.61, num_agreement=12)) == \
        "teacher agreement (mean token F1 with the teacher's labels on 12 held-out prompts)"
    # A gate report from before suites: real traffic made the teacher agreement the headline score.
    assert validation_measure(_report(teacher_agreement=0.61, num_agreement=12)).startswith("teacher agreement")
    assert validation_measure(_report(teacher_agreement=0.5, num_agreement=4)) == "held-out accuracy"
    own = {"policy": {"kind": "skill", "num_items": 30}, **heldout}
    assert validation_measure(_report(suites=own)) == "suite policy score"
    assert validation_measure(None) == "gate score"


def test_lineage_prints_teacher_agreement_not_accuracy():
    chain = {"version": "student-e/2", "live_as": ["champion"], "parent_version": "student-e/1", "kind": "adapter",
             "dataset": {"digest": "sha256:d", "replay_from": ""}, "adapter": {"digest": "a", "training_run_id": "r"},
             "merged": {"digest": "m", "path": "/m"}, "draft": {"digest": "dr", "path": "/d"},
             "validation": {"verdict": "pass", "candidate_acc": "0.6123", "champion_acc": "0.4",
                            "measure": validation_measure(_report(suites={"heldout-teacher": {
                                "kind": "skill", "num_items": 12}}, teacher_agreement=0.6123, num_agreement=12)),
                            "teacher_agreement": 0.6123, "champion_teacher_agreement": 0.4},
             "deployments": [], "promotion": {"decision": ""},
             "requests_served": {"total": 0, "ok": 0, "as_challenger": 0}, "mlflow_ui": "mlflow ui"}
    line = next(ln for ln in render(chain).splitlines() if "validation" in ln)
    assert line == ("  validation    pass (teacher agreement (mean token F1 with the teacher's labels on 12 held-out "
                    "prompts) 0.612 vs champion 0.400)")
    chain["validation"].update(measure="suite policy score")
    line = next(ln for ln in render(chain).splitlines() if "validation" in ln)
    assert line.endswith("(suite policy score 0.612 vs champion 0.400; teacher agreement 0.612 vs champion 0.400)")
    assert "accuracy" not in render(chain)
