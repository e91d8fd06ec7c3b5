"""Outcomes where feedback is thin (`data.judge`): the teacher grades unrated answers; the grades
are feedback rows marked `judge`, within the per-call caps, and every reader of outcomes uses them."""
import json

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
