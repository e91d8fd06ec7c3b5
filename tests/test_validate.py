"""The validation gate's rules, each with the numbers that pass and fail it. Generation is replaced by
scripted answers here (the gate's own arithmetic is under test; the full cycle test runs it for real)."""
import json

import pytest

import loop.validate.gate as gate
from loop.config import ValidationConfig
from loop.suites import Suite, SuiteItem, heldout_suite, parse_suite, token_f1


def test_token_f1_by_hand():
    assert token_f1("The Zorvex widget costs $59.", "The Zorvex widget costs $59.") == 1.0
    # 4 of 5 words shared each way: precision = recall = 0.8.
    assert token_f1("The Zorvex widget costs $60.", "The Zorvex widget costs $59.") == pytest.approx(0.8)
    assert token_f1("", "anything") == 0.0 and token_f1("", "") == 1.0


def _items(n, prefix, grader="contains"):
    return parse_suite("\n".join(json.dumps({"messages": [{"role": "user", "content": f"{prefix} {i}?"}],
                                             "reference": f"{prefix}-answer-{i}", "grader": grader})
                                 for i in range(n)), prefix)


POLICY = Suite("policy", "skill", _items(10, "policy"))
GENERAL = Suite("general", "regression", _items(20, "general"))
HELDOUT = [{"messages": [{"role": "user", "content": f"held {i}?"}], "completion": f"held answer {i}"}
           for i in range(4)]
BASE_ANSWERS = {f"prompt {i}": f"base says {i}" for i in range(40)}


@pytest.fixture
def scripted(monkeypatch, tmp_path):
    """Answers by model: `know[who]` is the set of questions `who` answers right (candidate, champion, base);
    the base regression suite is made from BASE_ANSWERS' prompts."""
    know = {"candidate": set(), "champion": set(), "base": set()}
    calls = []

    def fake(model_dir, conversations, max_new_tokens, adapter_dir=None):
        who = "candidate" if model_dir == "candidate" else "champion" if adapter_dir else "base"
        calls.append((who, len(conversations)))
        out = []
        for c in conversations:
            q = c[-1]["content"]
            prefix, _, i = q.rstrip("?").rpartition(" ")
            if q in BASE_ANSWERS:
                out.append(BASE_ANSWERS[q] if q in know[who] or who == "base" else "something else")
            elif prefix == "held":
                out.append(f"held answer {i}" if q in know[who] else "no idea")
            else:
                out.append(f"It is {prefix}-answer-{i}." if q in know[who] else "No idea.")
        return out

    monkeypatch.setattr(gate, "generate_answers", fake)
    monkeypatch.setattr(gate, "general_prompts",
                        lambda path=None: [[{"role": "user", "content": q}] for q in BASE_ANSWERS])
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    return {"know": know, "calls": calls, "base": base, "root": tmp_path / "suites"}


_RUNS = iter(range(10**6))


def _run(s, suites, heldout=None, champion_adapter="champion-adapter", candidate_key=None, **cfg):
    """The gate on scripted answers; each run's candidate is a new adapter unless `candidate_key` says."""
    v = gate.Validator(ValidationConfig(**cfg), s["root"])
    return v.run("candidate", s["base"], champion_adapter, suites, heldout,
                 candidate_key=candidate_key or f"candidate-{next(_RUNS)}", champion_key="champ-digest")


def _all(suite):
    return {i.conversation[-1]["content"] for i in suite.items}


def test_a_candidate_that_learned_and_forgot_nothing_passes(scripted):
    k = scripted["know"]
    k["candidate"] = _all(POLICY) | _all(GENERAL) | set(BASE_ANSWERS) | {r["messages"][0]["content"] for r in HELDOUT}
    k["champion"] = _all(GENERAL) | set(BASE_ANSWERS)
    report = _run(scripted, [POLICY, GENERAL], HELDOUT)
    assert report.passed, report.reasons
    assert (report.candidate_acc, report.champion_acc, report.num_questions) == (1.0, 0.0, 10)
    assert report.suites["policy"]["candidate"] == 1.0 and report.suites["general"]["base"] == 0.0
    assert report.suites["base-regression"] == {**report.suites["base-regression"], "candidate": 1.0, "base": 1.0,
                                                "num_items": 40, "passed": True}
    assert report.teacher_agreement == 1.0 and report.champion_teacher_agreement < 0.5 and report.num_agreement == 4


def test_forgetting_against_the_base_fails_even_when_the_champion_forgot_too(scripted):
    """Forgetting is measured against the original base, not the champion: a champion that already
    lost 10 of the 40 base answers does not excuse a candidate that lost them too."""
    k = scripted["know"]
    kept = set(list(BASE_ANSWERS)[:30])
    k["candidate"] = k["champion"] = _all(POLICY) | kept
    report = _run(scripted, [POLICY])
    s = report.suites["base-regression"]
    assert (s["candidate"], s["champion"], s["base"]) == (0.75, 0.75, 1.0) and not s["passed"]
    assert not report.passed and report.reasons == [
        "suite base-regression: 0.750, more than validation.max_regression_drop 0.05 below the base's 1.000"]
    k["candidate"] = k["champion"] | set(list(BASE_ANSWERS)[30:38])  # 38 of 40: 0.05 below the base
    v = gate.Validator(ValidationConfig(), scripted["root"])
    report = v.run("candidate", scripted["base"], "champion-adapter", [POLICY], candidate_key="another")
    assert report.suites["base-regression"]["candidate"] == 0.95 and report.passed, report.reasons


def test_a_regression_suite_against_the_champion_and_its_own_max_drop(scripted):
    k = scripted["know"]
    facts = Suite("earlier", "regression", _items(10, "earlier"), baseline="champion", options={"max_drop": 0.1})
    ordered = sorted(_all(facts))
    k["champion"] = set(ordered)
    k["candidate"] = set(ordered[:9]) | _all(POLICY) | set(BASE_ANSWERS)
    assert _run(scripted, [POLICY, facts]).passed  # one of ten: within its max_drop 0.1
    k["candidate"] -= {ordered[0]}
    report = _run(scripted, [POLICY, facts])
    assert report.suites["earlier"]["base"] is None and report.reasons == [
        "suite earlier: 0.800, more than its max_drop 0.1 below the champion's 1.000"]


def test_no_gain_on_a_skill_suite_and_disagreeing_with_the_teacher_are_both_recorded(scripted):
    k = scripted["know"]
    k["candidate"] = k["champion"] = set(BASE_ANSWERS) | set(list(_all(POLICY))[:5])
    report = _run(scripted, [POLICY], HELDOUT, min_accuracy_gain=0.1)
    assert not report.passed and report.teacher_agreement < 0.5
    assert len(report.reasons) == 2 and report.reasons[0].startswith("suite policy: 0.500 vs champion 0.500")
    assert report.reasons[1].startswith("agreement with the teacher on 4 held-out prompts")


def test_nothing_passes_vacuously(scripted):
    """No skill suite at all (no held-out labels, none named): a refusal with its reason, not a pass;
    an unreadable suite is a reason too; an empty suite file is refused when it is parsed."""
    scripted["know"]["candidate"] = set(BASE_ANSWERS)
    report = _run(scripted, [])
    assert not report.passed and report.reasons[0].startswith("no skill suite to measure what the cycle taught")
    report = gate.Validator(ValidationConfig(), scripted["root"]).run(
        "candidate", scripted["base"], None, [POLICY], [], refused=["suite x (validation.suites): missing"])
    assert "suite x (validation.suites): missing" in report.reasons and not report.passed
    with pytest.raises(Exception, match="no items"):
        parse_suite("\n\n", "empty.jsonl")


def test_answers_are_kept_per_version_and_the_base_suite_made_once(scripted):
    """The champion is last cycle's candidate: its answers come from the cache, not a second generation;
    the base regression suite is generated once and kept as a file."""
    k = scripted["know"]
    k["candidate"] = _all(POLICY) | set(BASE_ANSWERS)
    _run(scripted, [POLICY], candidate_key="same")
    first = list(scripted["calls"])
    assert ("base", 40) in first  # the base regression suite, made from the base's answers
    files = sorted(p.name for p in scripted["root"].glob("base-regression-*.jsonl"))
    assert len(files) == 1
    scripted["calls"].clear()
    _run(scripted, [POLICY], candidate_key="same")
    assert scripted["calls"] == [], "everything cached: candidate, champion and base suite"


def test_heldout_suite_from_labelled_rows():
    suite = heldout_suite(HELDOUT)
    assert suite.kind == "skill" and [i.reference for i in suite.items] == [r["completion"] for r in HELDOUT]
    assert isinstance(suite.items[0], SuiteItem) and suite.items[0].grader == "token_f1"


def test_beside_a_skill_suite_the_heldout_labels_are_agreement_only(scripted):
    """The user's (or the demo world's) skill suite decides the gain; the held-out teacher labels then
    only have to reach min_teacher_agreement, a few noisy items cannot veto a candidate that learned."""
    k = scripted["know"]
    held = {r["messages"][0]["content"] for r in HELDOUT}
    k["candidate"] = _all(POLICY) | set(BASE_ANSWERS) | set(sorted(held)[:3])
    k["champion"] = set(BASE_ANSWERS) | held
    report = _run(scripted, [POLICY], HELDOUT, min_teacher_agreement=0.5)
    assert report.passed, report.reasons
    assert report.suites["heldout-teacher"]["candidate"] < report.suites["heldout-teacher"]["champion"]
    alone = _run(scripted, [], HELDOUT, min_teacher_agreement=0.5)
    assert not alone.passed and alone.reasons[0].startswith("suite heldout-teacher: ")
