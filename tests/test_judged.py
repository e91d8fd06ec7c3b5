"""Outcomes where feedback is thin (`data.judge`): the teacher grades unrated answers; the grades
are feedback rows marked `judge`, within the per-call caps, and every reader of outcomes uses them."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from loop.config import ConfigError, OutcomeJudgeConfig, load_config
from loop.control.controller import feedback_scores
from loop.control.judged import judge_unrated, unrated
from loop.data.select import select_prompts
from loop.teacher.judge import JudgeUsage


class FakeJudge:
    """Grades by a rule (1.0 when the answer says 'right'); each grade costs $0.01 and 10 tokens."""

    def __init__(self):
        self.usage, self.asked = JudgeUsage(), []

    def grade(self, conversation, answer, reference=None):
        self.asked.append((conversation, answer))
        self.usage.calls += 1
        self.usage.cost_usd += 0.01
        self.usage.prompt_tokens += 10
        if answer == "garbled":
            self.usage.failed += 1
            return 0.0
        return 1.0 if "right" in answer else 0.2


def _row(i, answer, tenant="acme", status=200):
    return {"request_id": f"req-{i}", "tenant": tenant, "status": status, "user": f"u{i % 3}",
            "prompt": json.dumps([{"role": "user", "content": f"question {i}"}]), "completion": answer,
            "ts": 100.0 + i, "escalated": False, "confidence": -0.1, "endpoint": "e", "model_version": "v1",
            "source": "gateway"}


def test_unrated_answers_are_graded_once_and_become_judge_outcomes():
    rows = [_row(i, "right" if i % 2 else "wrong") for i in range(10)] + [_row(10, "", status=500)]
    feedback = [{"request_id": "req-0", "tenant": "acme", "score": 1.0, "ts": 1.0}]
    # Another tenant's feedback on the same id does not rate acme's request.
    feedback.append({"request_id": "req-1", "tenant": "globex", "score": 1.0, "ts": 1.0})
    written = []
    judge = FakeJudge()
    got = judge_unrated(OutcomeJudgeConfig(sample_fraction=1.0), rows, feedback, judge, written.extend)
    assert got.graded == 9 and got.candidates == 9 and got.stopped == "", got
    assert got.cost_usd == pytest.approx(0.09) and got.tokens == 90
    assert {g["request_id"] for g in written} == {f"req-{i}" for i in range(1, 10)}
    assert all(g["source"] == "judge" and g["tenant"] == "acme" for g in written)
    assert judge.asked[0][0] == [{"role": "user", "content": "question 1"}], "the trace's messages are the question"
    scores = feedback_scores(feedback + written, since=0.0)
    assert scores[("acme", "req-1")] == 1.0 and scores[("acme", "req-2")] == 0.2
    # A second pass over the same requests grades nothing: each now has feedback.
    again = judge_unrated(OutcomeJudgeConfig(sample_fraction=1.0), rows, feedback + written, FakeJudge(), written.extend)
    assert again.graded == 0 and again.candidates == 0
    # Selection relabels what the judge graded low (negative feedback), not what it graded high.
    sel = select_prompts(rows[:10], feedback + written, max_prompts=100, sample_size=0, min_confidence=None,
                         negative_score=0.5, heldout_fraction=0.0, seed=0)
    chosen = {r["prompt"] for r in sel.train}
    assert chosen == {rows[i]["prompt"] for i in (2, 4, 6, 8)}, chosen


def test_grading_stops_at_the_budget_and_the_request_cap_and_skips_failed_grades():
    rows = [_row(i, "garbled" if i == 0 else "right") for i in range(40)]
    written = []
    capped = judge_unrated(OutcomeJudgeConfig(sample_fraction=1.0, max_requests=5), rows, [], FakeJudge(), written.extend)
    assert (capped.graded, capped.stopped, capped.failed) == (5, "max_requests", 1)
    assert len(written) == 4, "a failed grade is no outcome"
    budget = judge_unrated(OutcomeJudgeConfig(sample_fraction=1.0, budget_usd=0.035), rows, [], FakeJudge(), [].extend)
    assert (budget.graded, budget.stopped) == (4, "budget") and budget.cost_usd < 0.045


def test_an_escalated_answer_is_the_teachers_and_is_not_graded():
    rows = [_row(0, "right"), {**_row(1, "right"), "escalated": True}]
    assert [r["request_id"] for r in unrated(rows, [], 1.0)] == ["req-0"]


def test_the_sample_is_a_stable_fraction():
    rows = [_row(i, "right") for i in range(400)]
    first = unrated(rows, [], 0.25)
    assert 60 < len(first) < 140
    assert [r["request_id"] for r in first] == [r["request_id"] for r in unrated(rows, [], 0.25)]


def test_a_local_teacher_cannot_judge(tmp_path):
    import yaml

    raw = yaml.safe_load(open("configs/byo.yaml"))
    raw["teacher"] = {"kind": "local", "path": "models/teacher"}
    raw["data"]["judge"] = {"sample_fraction": 0.5}
    raw["validation"] = {}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="data.judge: the teacher grades answers over HTTP"):
        load_config(path)


class _Lineage:
    """The registry and MLflow calls of one promotion step, kept in memory."""

    def __init__(self, deployed_at: str):
        self.versions = {"champion": {"version": "student-e/1", "number": 1, "deployed_at": ""},
                         "challenger": {"version": "student-e/2", "number": 2, "deployed_at": deployed_at}}
        self.metrics, self.tags = [], {}
        self.client = SimpleNamespace(get_model_version=lambda name, n: SimpleNamespace(tags=dict(self.tags)),
                                      log_batch=lambda run_id, metrics: self.metrics.append(
                                          {m.key: m.value for m in metrics}))

    def version_info(self, endpoint, alias):
        return self.versions[alias]

    def start_run(self, name, tags):
        return "run-1"

    def tag_version(self, endpoint, number, tags):
        self.tags.update({k: str(v) for k, v in tags.items()})

    def log_dict(self, *args):
        pass

    def log(self, *args, **kwargs):
        pass


def test_each_promotion_step_grades_the_arms_unrated_answers_once_and_counts_them(tmp_path, monkeypatch):
    """The controller judges inside its step (the canary stage and `--forever` alike): the unrated
    answers of both arms get a grade each, which is an outcome of that step; the next step grades
    nothing again; a user's own score is never overruled; the step's grades and cost go to MLflow."""
    from datetime import datetime, timezone

    import ray
    import yaml

    from loop.control.controller import PromotionController
    from loop.traces.log import TraceLog, read_feedback

    raw = yaml.safe_load(open("configs/byo.yaml"))
    raw["storage"]["root"] = str(tmp_path / "state")
    raw["validation"]["suites"][0]["path"] = str(Path("configs/suites/expense-policy.jsonl").resolve())
    raw["data"]["judge"] = {"sample_fraction": 1.0, "max_requests": 100}
    raw["promotion"].update(min_samples=3, max_latency_p95_ratio=100.0)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(raw))
    cfg = load_config(tmp_path / "c.yaml")
    log = TraceLog(cfg.storage.path("traces"))
    rows = [dict(_row(i, "right" if i % 2 else "wrong", tenant="acme"), endpoint="e", latency_ms=100.0, variant="",
                 model_version="student-e/2" if i < 8 else "student-e/1") for i in range(16)]
    log.append(rows)
    log.append_feedback([{"request_id": "req-3", "tenant": "acme", "score": 0.0, "label": None, "ts": 200.0}])
    monkeypatch.setattr(ray, "get", lambda value: value)  # the trace log below is a plain object
    lineage = _Lineage(datetime.fromtimestamp(50.0, timezone.utc).isoformat())
    services = SimpleNamespace(cfg=cfg, lineage=lineage, teacher_url="http://unused",
                               trace_log=SimpleNamespace(append_feedback=SimpleNamespace(remote=log.append_feedback)))
    controller = PromotionController(services)
    controller._judge = judge = FakeJudge()

    decision = controller.step("e", act=False)
    assert len(judge.asked) == 15, "every answer of both arms but the one a user rated"
    graded = [f for f in read_feedback(cfg.storage.path("traces")) if f.get("source") == "judge"]
    assert len(graded) == 15 and "req-3" not in {f["request_id"] for f in graded}
    # Challenger (req-0..7): odd ids answered "right" (4), req-3 rated 0.0 by its user -> 3 of 8.
    assert decision.challenger["outcomes"] == 8 and decision.challenger["successes"] == 3
    assert decision.champion["outcomes"] == 8 and decision.champion["successes"] == 4
    assert lineage.metrics[-1]["judge.graded"] == 15 and lineage.metrics[-1]["judge.cost_usd"] == pytest.approx(0.15)

    again = controller.step("e", act=False)
    assert len(judge.asked) == 15, "a graded request is not graded again"
    assert again.challenger["successes"] == 3 and lineage.metrics[-1]["judge.graded"] == 0
