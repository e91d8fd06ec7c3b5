"""Evaluation suites as data: graders on numbers, bad files refused with file, line, field and fix
(by the parser and by every command that loads the config), the shipped general prompts."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loop.config import ConfigError, load_config
from loop.suites import (SuiteError, SuiteItem, general_prompts, grade, load_suite, mean_score,
                                  parse_suite)

ROOT = Path(__file__).resolve().parent.parent


def _item(grader, reference, threshold=None):
    return SuiteItem(({"role": "user", "content": "q"},), reference, grader, threshold)


@pytest.mark.parametrize("grader,reference,answer,score", [
    ("exact", "Paris", "paris.", 1.0), ("exact", "Paris", "It is Paris.", 0.0),
    ("contains", "receipt within 30 days", "Send the Receipt within 30 days, please.", 1.0),
    ("contains", "30 days", "within 3 days", 0.0),
    ("regex", r"\$59(?!\d)", "It costs $59.", 1.0), ("regex", r"\$59(?!\d)", "It costs $590.", 0.0),
    ("token_f1", "The widget costs $59.", "The widget costs $60.", 0.75),
])
def test_graders_score_answers(grader, reference, answer, score):
    assert grade(_item(grader, reference), answer) == pytest.approx(score)


def test_token_f1_with_a_threshold_is_pass_or_fail():
    assert grade(_item("token_f1", "a b c d", 0.5), "a b x y") == 1.0  # F1 0.5
    assert grade(_item("token_f1", "a b c d", 0.5), "a x y z") == 0.0  # F1 0.25


def test_judge_grader_asks_the_judge_and_needs_one():
    item = _item("judge", None)
    assert grade(item, "answer", judge=lambda i, a: 0.7) == 0.7
    with pytest.raises(SuiteError, match="judge"):
        grade(item, "answer")


def test_an_empty_suite_never_passes():
    with pytest.raises(SuiteError, match="empty suite"):
        mean_score([], [])


BAD = [
    ('not json', "not JSON"),
    ('{"messages": []}', "messages: required"),
    ('{"messages": [{"role": "robot", "content": "hi"}], "reference": "x"}', "messages[0]"),
    ('{"messages": [{"role": "user", "content": "hi"}], "grader": "bleu", "reference": "x"}', "grader: unknown 'bleu'"),
    ('{"messages": [{"role": "user", "content": "hi"}], "grader": "exact"}', "reference: required by grader 'exact'"),
    ('{"messages": [{"role": "user", "content": "hi"}], "grader": "regex", "reference": "("}', "not a valid regular"),
    ('{"messages": [{"role": "user", "content": "hi"}], "reference": "x", "score": 1}', "unknown field(s) ['score']"),
    ('{"messages": [{"role": "user", "content": "hi"}], "reference": "x", "threshold": 2}', "threshold: a number"),
]


def test_every_bad_line_is_named_with_its_field():
    good = '{"messages": [{"role": "user", "content": "hi"}], "reference": "hello"}'
    text = "\n".join([good] + [line for line, _ in BAD])
    with pytest.raises(SuiteError) as e:
        parse_suite(text, "my.jsonl")
    lines = str(e.value).splitlines()
    assert len(lines) == len(BAD)
    for i, ((_, want), got) in enumerate(zip(BAD, lines), start=2):
        assert got.startswith(f"my.jsonl:{i}: ") and want in got, got


def _config_with_suite(tmp_path, suite_text, **entry):
    raw = yaml.safe_load((ROOT / "configs" / "tiny.yaml").read_text())
    (tmp_path / "suite.jsonl").write_text(suite_text)
    raw["validation"]["suites"] = [{"name": "mine", "kind": "skill", "path": str(tmp_path / "suite.jsonl"), **entry}]
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_bad_suite_file_is_refused_by_every_config_load_and_config_check(tmp_path):
    path = _config_with_suite(tmp_path, '{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "validation.suites[0]" in str(e.value) and "suite.jsonl:1: reference: required" in str(e.value)
    out = subprocess.run([sys.executable, "-m", "loop.cli", "config", "check", str(path)], capture_output=True,
                         text=True, cwd=ROOT)
    assert out.returncode == 1 and "suite.jsonl:1: reference: required by grader 'token_f1'" in out.stderr
    empty = _config_with_suite(tmp_path, "\n")
    with pytest.raises(ConfigError, match="the suite has no items"):
        load_config(empty)
    missing = tmp_path / "c2.yaml"
    raw = yaml.safe_load(path.read_text())
    raw["validation"]["suites"][0]["path"] = str(tmp_path / "nowhere.jsonl")
    missing.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="no such suite file"):
        load_config(missing)


def test_a_good_suite_loads_with_its_digest(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}], "reference": f"a{i}", "grader": "contains"}
            for i in range(3)]
    (tmp_path / "s.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = load_suite(tmp_path / "s.jsonl", "s", "skill")
    assert len(suite.items) == 3 and suite.digest.startswith("sha256:") and suite.items[2].reference == "a2"
    cfg = load_config(_config_with_suite(tmp_path, (tmp_path / "s.jsonl").read_text(), min_gain=0.1))
    assert cfg.validation.suites[0].min_gain == 0.1


def test_the_shipped_general_prompts():
    prompts = general_prompts()
    assert len(prompts) >= 100 and len({json.dumps(p) for p in prompts}) == len(prompts)
    assert all(p[-1]["role"] == "user" and p[-1]["content"] for p in prompts)


def test_the_simulated_worlds_suite_grades_as_the_world_does(tmp_path):
    """The demo's facts reach the gate as a regex suite: the same verdict as the world's own is_correct."""
    from loop.sim.world import World, is_correct, value_pattern

    world = World(7, 2, 10)
    for f in world.facts:
        item = _item("regex", value_pattern(f.value))
        for answer in (f.answer(), f"It is {f.value}0.", "I don't know.", f.answer().upper()):
            assert grade(item, answer) == float(is_correct(f, answer)), (f, answer)
