"""The run report from what cycles leave on disk: accuracy lines, targets, cost per request, files."""
import json

import yaml

from conftest import ROOT
from loop import run_report as report
from loop.config import load_config
from loop.cycle.results import (CanaryResult, DraftResult, EvaluateResult, LabelResult, StageRecord, TrafficResult,
                                to_json)
from loop.traces.log import TraceLog


def _config(tmp_path):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    raw["storage"]["root"] = str(tmp_path)
    raw["teacher"] = {**raw.get("teacher", {}), "usd_per_million_prompt_tokens": 2.0,
                      "usd_per_million_completion_tokens": 10.0}
    raw["cost"] = {"student_usd_per_million_prompt_tokens": 0.02, "student_usd_per_million_completion_tokens": 0.1}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def _cycle(cfg, n, static, before, after, regression, t0, label_cost, labels):
    d = cfg.storage.path("cycles", "tiny-support", f"cycle-{n:04d}")
    for stage, result in {
        "traffic": TrafficResult(requests=10, served_by="", record=StageRecord(started_at=t0)),
        "canary": CanaryResult(decision="promote", reasons=[], requests=10),
        "label": LabelResult(dataset="train.jsonl", dataset_digest="", selected=labels, labelled=labels + 1, cutoff=t0,
                             replay="", teacher_cached=1, from_escalation=1, kept=3, teacher_cost_usd=label_cost,
                             teacher_completion_tokens=10 * labels),
        "draft": DraftResult(draft_path="draft", draft_digest="", acceptance_stale=0.2, acceptance_cotrained=0.9, k=3),
        "evaluate": EvaluateResult(served_by="", record=StageRecord(ended_at=t0 + 100))}.items():
        (d / stage).mkdir(parents=True)
        (d / stage / "result.json").write_text(json.dumps(to_json(result)))
    (d / "report.json").write_text(json.dumps({
        "endpoint": "tiny-support", "cycle": n, "epoch": n, "student_acc_before": before, "student_acc_after": after,
        "teacher_acc": 1.0, "static_acc": static, "regression_acc": regression, "base_regression_acc": 1.0,
        "new_version": f"student-tiny-support/{n + 1}", "validation_passed": True, "promotion": "promote",
        "served_after": f"student-tiny-support/{n + 1}", "stage_seconds": {"train": 50.0, "canary": 10.0}}))


def test_report_numbers_targets_and_files(tmp_path):
    cfg = _config(tmp_path)
    log = TraceLog(cfg.storage.path("traces"))
    rows = []
    for n, (static, before, after) in enumerate([(0.6, 0.6, 0.95), (0.4, 0.7, 1.0)], start=1):
        t0 = 1000.0 * n
        _cycle(cfg, n, static, before, after, 1.0, t0, label_cost=0.0004, labels=4)
        rows += [dict(request_id=f"r{n}-{i}", tenant="acme", endpoint="tiny-support", variant="champion",
                      model_version="v", user=f"sim-user-{i}", prompt_tokens=40, completion_tokens=12,
                      escalated=i == 0, ts=t0 + 1 + i) for i in range(20)]
    rows.append(dict(request_id="late", tenant="acme", endpoint="tiny-support", variant="champion",
                     model_version="v", user="sim-user-1", prompt_tokens=40, completion_tokens=12, ts=5000.0))
    log.append(rows)
    rep = report.build(cfg, [("tiny-support", 1), ("tiny-support", 2)], "r1", wall_seconds=300)
    money = rep["cost"]
    assert money["requests"] == 40 and money["escalated"] == 2, "only requests inside the cycles' windows"
    assert rep["student_share"] == 38 / 40
    student = 40 * (40 * 0.02 + 12 * 0.1) / 1e6
    per_teacher_call = (40 * 2.0 + 10 * 10.0) / 1e6  # the teacher's answers are as long as its labels
    total = student + 2 * per_teacher_call + 2 * 0.0004
    assert abs(money["usd"]["total"] - total) < 1e-12
    assert abs(rep["cost_ratio_vs_teacher"] - total / (40 * per_teacher_call)) < 1e-9
    assert money["teacher_calls"] == {"escalation": 2, "labels": 8}
    assert money["labels"] == {"used": 10, "from_teacher_calls": 8, "from_escalations": 2, "from_cache": 0}
    c1, c2 = rep["cycles"]
    assert (c1["static_acc"], c1["champion_acc"], c2["static_acc"], c2["champion_acc"]) == (0.6, 0.95, 0.4, 1.0)
    assert c1["requests"] == 20 and c1["draft_acceptance_cotrained"] == 0.9 and c1["regression_drop_pts"] == 0.0
    t = rep["targets"]
    assert t["champion_over_teacher_min"] == {"value": 0.95, "met": True}
    assert t["static_falls_every_epoch"]["met"] and t["champion_above_static"]["met"]
    assert t["student_share"]["met"] and t["regression_drop_pts_max"]["met"]
    out = report.write(cfg, rep)
    assert json.loads((out / "report.json").read_text())["cycles"][1]["epoch"] == 2
    assert (out / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "![accuracy per epoch](accuracy.png)" in md and "| tiny-support | 2 | 2 | 0.40 |" in md
    assert not out.with_name("r1.tmp").exists()


def test_a_missed_target_is_reported_as_missed(tmp_path):
    cfg = _config(tmp_path)
    _cycle(cfg, 1, 0.5, 0.5, 0.6, 0.8, 1000.0, label_cost=0.0, labels=0)
    rep = report.build(cfg, [("tiny-support", 1)], "r2")
    t = rep["targets"]
    assert t["champion_over_teacher_min"] == {"value": 0.6, "met": False}
    assert t["regression_drop_pts_max"]["value"] == 100 * (1.0 - 0.8) and t["regression_drop_pts_max"]["met"] is False
    assert rep["cost"]["requests"] == 0 and rep["student_share"] is None and t["student_share"]["met"] is None
