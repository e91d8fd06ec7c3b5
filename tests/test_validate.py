"""The validation gate's checks, each with the numbers that pass and fail it. Generation is replaced by
scripted answers here (the gate's own arithmetic is under test; the full cycle test runs it for real)."""
import pytest

import loop.validate.gate as gate
from loop.config import ValidationConfig
from loop.sim.world import GENERAL_QUESTIONS, World


def test_token_f1_by_hand():
    assert gate.token_f1("The Zorvex widget costs $59.", "The Zorvex widget costs $59.") == 1.0
    # 4 of 5 words shared each way: precision = recall = 0.8.
    assert gate.token_f1("The Zorvex widget costs $60.", "The Zorvex widget costs $59.") == pytest.approx(0.8)
    assert gate.token_f1("", "anything") == 0.0 and gate.token_f1("", "") == 1.0


WORLD = World(7, 2, 10)
EARLIER = {f.entity for f in WORLD.facts if f.entity not in WORLD.changed}
HELDOUT = [{"messages": [{"role": "user", "content": f.question(0)}], "completion": f.answer()} for f in WORLD.facts[:4]]


def _script(monkeypatch, candidate, champion):
    """Answer as `candidate(kind, i)` / `champion(kind, i)` say, kind in facts | general | heldout."""
    n, g = len(WORLD.facts), len(GENERAL_QUESTIONS)

    def fake(model_dir, questions, max_new_tokens, adapter_dir=None):
        who = champion if adapter_dir == "champion-adapter" else candidate
        kinds = ["facts"] * n + ["general"] * g + ["heldout"] * (len(questions) - n - g)
        offsets = {"facts": 0, "general": n, "heldout": n + g}
        return [who(k, i - offsets[k]) for i, k in enumerate(kinds)]

    monkeypatch.setattr(gate, "generate_answers", fake)


def _right(kind, i):
    if kind == "facts":
        return WORLD.facts[i].answer()
    if kind == "general":
        return f"It is {GENERAL_QUESTIONS[i][1]}."
    return HELDOUT[i]["completion"]


def _run(**cfg):
    return gate.Validator(ValidationConfig(**cfg)).run("candidate", "base", "champion-adapter", WORLD.facts,
                                                       EARLIER, HELDOUT)


def test_a_candidate_as_good_as_the_teacher_passes(monkeypatch):
    _script(monkeypatch, _right, lambda k, i: "I don't know." if k == "facts" else _right(k, i))
    report = _run()
    assert report.passed and report.candidate_acc == 1.0 and report.champion_acc == 0.0
    assert report.regression_candidate == 1.0 and report.teacher_agreement == 1.0
    assert report.num_regression == len(EARLIER) + len(GENERAL_QUESTIONS) and report.num_agreement == 4


def test_forgetting_fails_the_regression_check(monkeypatch):
    forgot = {0, 1}  # two general questions of the regression set now wrong
    _script(monkeypatch, lambda k, i: "No idea." if k == "general" and i in forgot else _right(k, i), _right)
    report = _run()
    drop = 2 / (len(EARLIER) + len(GENERAL_QUESTIONS))
    assert report.regression_champion - report.regression_candidate == pytest.approx(drop)
    assert not report.passed and len(report.reasons) == 1
    assert "validation.max_regression_drop 0.04" in report.reasons[0]
    assert _run(max_regression_drop=0.1).passed, "within a looser tolerance"


def test_disagreeing_with_the_teacher_and_no_gain_are_both_recorded(monkeypatch):
    _script(monkeypatch, lambda k, i: "Something else entirely." if k == "heldout" else _right(k, i), _right)
    report = _run(min_accuracy_gain=0.1)
    assert not report.passed and report.teacher_agreement == 0.0 and report.champion_teacher_agreement == 1.0
    assert [r.split(" ")[0] for r in report.reasons] == ["held-out", "agreement"]


def test_without_a_simulated_world_the_new_skill_is_teacher_agreement(monkeypatch):
    """traffic.simulate false: no facts; the candidate must agree with the held-out teacher labels more
    than the champion, and the regression set is the general questions."""
    g = len(GENERAL_QUESTIONS)

    def fake(model_dir, questions, max_new_tokens, adapter_dir=None):
        assert len(questions) == g + len(HELDOUT) and questions[g:] == [row["messages"] for row in HELDOUT]
        champion = adapter_dir == "champion-adapter"
        return ([f"It is {v}." for _, v in GENERAL_QUESTIONS]
                + [("I don't know." if champion else row["completion"]) for row in HELDOUT])

    monkeypatch.setattr(gate, "generate_answers", fake)
    report = gate.Validator(ValidationConfig(min_accuracy_gain=0.5)).run("candidate", "base", "champion-adapter",
                                                                        [], set(), HELDOUT)
    assert report.candidate_acc == 1.0 and report.champion_acc < 0.2 and report.num_questions == len(HELDOUT)
    assert report.num_regression == g and report.regression_candidate == 1.0 and report.passed
    assert report.reference_questions == [q for q, _ in GENERAL_QUESTIONS][:ValidationConfig().parity_questions]
    # The same answers with the roles swapped: the candidate is the one that does not know.
    same = gate.Validator(ValidationConfig(min_accuracy_gain=0.5)).run("candidate", "base", "champion-adapter",
                                                                      [], set(), HELDOUT)
    monkeypatch.setattr(gate, "generate_answers", lambda m, q, n, adapter_dir=None: fake(
        m, q, n, None if adapter_dir == "champion-adapter" else "champion-adapter"))
    worse = gate.Validator(ValidationConfig(min_accuracy_gain=0.5)).run("candidate", "base", "champion-adapter",
                                                                       [], set(), HELDOUT)
    assert same.passed and not worse.passed and worse.reasons[0].startswith("held-out accuracy")
