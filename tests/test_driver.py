"""The driver: endpoints are independent (one failing does not stop the others), and `--forever`
starts a cycle when the schedule says and re-decides live challengers in between."""
import json
from types import SimpleNamespace

import pytest
import yaml

from conftest import ROOT
from loop import driver
from loop.config import LoopConfig


def _cfg(tmp_path, **sections):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path)
    raw.update(sections)
    return LoopConfig.model_validate(raw)


class FakeCycle:
    """Writes the report a finished cycle leaves; fails for the endpoints in `failing`."""
    failing: set = set()
    ran: list = []

    def __init__(self, cfg, services, endpoint, number, api_key, progress):
        self.cfg, self.endpoint, self.number = cfg, endpoint, number

    def run(self):
        from loop.cycle import CycleFailed, CycleReport

        FakeCycle.ran.append((self.endpoint.id, self.number))
        if self.endpoint.id in FakeCycle.failing:
            raise CycleFailed(f"no new traffic for model-{self.endpoint.id}")
        d = self.cfg.storage.path("cycles", self.endpoint.id, f"cycle-{self.number:04d}")
        d.mkdir(parents=True, exist_ok=True)
        (d / "report.json").write_text("{}")
        return CycleReport(self.endpoint.id, self.number, self.number)


REACHABLE = SimpleNamespace(wait_reachable=lambda timeout_s: 0.0)


@pytest.fixture
def fake_cycles(monkeypatch):
    import loop.cycle

    monkeypatch.setattr(loop.cycle, "Cycle", FakeCycle)
    FakeCycle.ran, FakeCycle.failing = [], set()
    return FakeCycle


def test_one_endpoint_failing_does_not_stop_the_others(tmp_path, fake_cycles, capsys):
    cfg = _cfg(tmp_path)
    fake_cycles.failing = {"tiny-support"}
    services = SimpleNamespace(gateway_url="http://127.0.0.1:1/v1", lineage=REACHABLE)
    with pytest.raises(driver.EndpointsFailed) as e:
        driver._cycles(cfg, services, {"acme": "k", "globex": "k"}, 2, 0.0, cfg.endpoints())
    # tiny-support failed once and was not retried within the run; globex-chat ran both cycles.
    assert fake_cycles.ran == [("tiny-support", 1), ("globex-chat", 1), ("globex-chat", 2)]
    assert set(e.value.failed) == {"tiny-support"} and len(e.value.reports) == 2
    assert "model-tiny-support: FAILED: no new traffic" in capsys.readouterr().out


def test_an_unreachable_mlflow_stops_the_run_with_one_line_and_runs_no_stage(tmp_path, fake_cycles, capsys):
    from loop.lineage.registry import Lineage, LineageUnavailable

    lineage = Lineage.__new__(Lineage)
    lineage.tracking_uri, lineage.experiment_id = "http://127.0.0.1:9/", "0"

    def refuse(experiment_id):
        raise ConnectionError("connection refused")

    lineage.client = SimpleNamespace(get_experiment=refuse)
    cfg = _cfg(tmp_path, storage={"root": str(tmp_path), "tracking_wait_s": 0.3})
    with pytest.raises(driver.EndpointsFailed) as e:
        driver._cycles(cfg, SimpleNamespace(lineage=lineage, gateway_url="http://127.0.0.1:1/v1"), {"acme": "k", "globex": "k"}, 1, 0.0, cfg.endpoints())
    assert fake_cycles.ran == [], "no stage ran against a registry that does not answer"
    assert all("MLflow at http://127.0.0.1:9/ has not answered" in m and "storage.mlflow_tracking_uri" in m
               for m in e.value.failed.values()) and len(e.value.failed) == 2
    with pytest.raises(LineageUnavailable):
        lineage.wait_reachable(0.0)
    assert "has not answered" in capsys.readouterr().out


def test_forever_runs_cycles_on_schedule_and_decides_in_between(tmp_path, fake_cycles, monkeypatch):
    cfg = _cfg(tmp_path, schedule={"min_new_traces": 50, "poll_s": 1},
               promotion={"check_interval_s": 1, "min_samples": 8})
    traces = {"tiny-support": iter([0, 10, 60, 0, 0]), "globex-chat": iter([0, 0, 0, 0, 0])}
    monkeypatch.setattr(driver, "new_traces", lambda cfg, endpoint: next(traces[endpoint]))
    steps = []

    class FakeController:
        def __init__(self, services):
            pass

        def step(self, endpoint):
            steps.append(endpoint)
            return None

    import loop.control.controller

    monkeypatch.setattr(loop.control.controller, "PromotionController", FakeController)
    clock = {"t": 1000.0}
    monkeypatch.setattr(driver.time, "time", lambda: clock["t"])

    def sleep(s):
        clock["t"] += s
        if clock["t"] > 1004:
            raise KeyboardInterrupt

    monkeypatch.setattr(driver.time, "sleep", sleep)
    with pytest.raises(KeyboardInterrupt):
        driver._forever(cfg, SimpleNamespace(lineage=REACHABLE), {"acme": "k", "globex": "k"}, cfg.endpoints())
    # Only tiny-support reached 50 new traces (on the third poll); nobody had a timer.
    assert fake_cycles.ran == [("tiny-support", 1)]
    assert steps.count("tiny-support") == 5 and steps.count("globex-chat") == 5


def test_new_traces_counts_since_the_last_cycle_cutoff(tmp_path):
    from loop.traces.log import TraceLog, TraceRecord

    cfg = _cfg(tmp_path)
    log = TraceLog(str(cfg.storage.path("traces")))
    for i, (endpoint, user, ts) in enumerate([("tiny-support", "u1", 10.0), ("tiny-support", "u2", 20.0),
                                              ("tiny-support", "loop-eval", 30.0), ("globex-chat", "u1", 40.0)]):
        log.append([TraceRecord(f"r{i}", "acme", endpoint, "champion", "v", user=user, ts=ts).__dict__])
    assert driver.new_traces(cfg, "tiny-support") == 2, "evaluation traffic does not count"
    label = cfg.storage.path("cycles", "tiny-support", "cycle-0001", "label")
    label.mkdir(parents=True)
    (label / "result.json").write_text(json.dumps({"cutoff": 15.0}))
    (label.parent / "report.json").write_text("{}")
    assert driver.new_traces(cfg, "tiny-support") == 1
