"""Resumable stages: a finished stage is skipped while its outputs match its manifest of digests; an
output changed behind its back runs it again, and every stage after it."""
import json
from dataclasses import dataclass, field
from types import SimpleNamespace

import yaml

from conftest import ROOT
from loop.config import LoopConfig
from loop.cycle import Cycle
from loop.cycle.results import StageRecord
from loop.lineage.registry import Lineage


@dataclass
class Counted:
    n: int
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


def _cycle(tmp_path, log):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path)
    cfg = LoopConfig.model_validate(raw)
    services = SimpleNamespace(lineage=Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts")), world=None)
    return Cycle(cfg, services, cfg.tenants[0].endpoints[0], 1, "unused", progress=log.append)


def _stages(cycle, calls):
    def first(ctx, sdir, run_id):
        calls.append("first")
        (sdir / "rows.jsonl").write_text('{"x": 1}\n')
        (sdir / "model").mkdir(exist_ok=True)
        (sdir / "model" / "w.bin").write_bytes(b"\x01\x02")
        (sdir / "notes.json").write_text("{}")
        return Counted(1)

    def second(ctx, sdir, run_id):
        calls.append("second")
        return Counted(2)

    return cycle.stage("first", Counted, first), cycle.stage("second", Counted, second)


def test_a_finished_stage_is_skipped_until_its_outputs_change(tmp_path):
    calls, log = [], []
    a, _ = _stages(_cycle(tmp_path, log), calls)
    assert calls == ["first", "second"]
    assert set(a.record.manifest) == {"rows.jsonl", "model"}, "outputs, not the report beside them"
    assert a.record.manifest["model"].startswith("sha256:")
    again, _ = _stages(_cycle(tmp_path, log), calls)
    assert calls == ["first", "second"], "both resumed from their results"
    assert again == a and isinstance(again, Counted), "the result read back is the one written, typed"
    assert "  [first] done in an earlier run, skipped" in log
    # A report beside the outputs may change.
    (tmp_path / "cycles" / "tiny-support" / "cycle-0001" / "first" / "notes.json").write_text('{"more": 1}')
    _stages(_cycle(tmp_path, log), calls)
    assert calls == ["first", "second"]
    # An output that changed: that stage and every later one run again.
    (tmp_path / "cycles" / "tiny-support" / "cycle-0001" / "first" / "model" / "w.bin").write_bytes(b"\x09")
    _stages(_cycle(tmp_path, log), calls)
    assert calls == ["first", "second", "first", "second"]
    assert any("outputs ['model'] differ from its manifest" in line for line in log)
    result = json.loads((tmp_path / "cycles" / "tiny-support" / "cycle-0001" / "second" / "result.json").read_text())
    assert result["n"] == 2 and result["_ended_at"] >= result["_started_at"]
