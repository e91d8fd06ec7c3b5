"""Evaluation suites as data: what "a right answer" means for a domain, in a JSONL file.

A suite is one file of `{"messages": [...], "reference"?: str, "grader"?: str, "threshold"?: float}`
lines, with a `kind` (`skill`: what a cycle should teach; `regression`: what it must not forget)
and the thresholds of its config entry (`validation.suites`). Graders score one answer in [0, 1]:
`exact`, `contains` and `regex` against `reference`, `token_f1` (SQuAD-style word overlap, or pass /
fail at `threshold`), and `judge` (the teacher grades the answer against a rubric; loop/teacher/judge.py).
This module knows nothing about models, Ray or HTTP: it reads files and does arithmetic.
"""
from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable

GRADERS = ("exact", "contains", "regex", "token_f1", "judge")
"""Graders that need a `reference`: every one but `judge` (which may use one)."""
ROLES = ("system", "user", "assistant")


class SuiteError(ValueError):
    """A suite file that cannot be used: one line per problem, naming the file, line, field and fix."""


@dataclass(frozen=True)
class SuiteItem:
    messages: tuple
    """The conversation asked, as ({"role", "content"}, ...) dicts (a tuple: items are hashable)."""
    reference: str | None
    grader: str
    threshold: float | None = None
    """`token_f1` only: the item scores 1 when the F1 reaches this, else 0 (None: the F1 itself)."""

    @property
    def conversation(self) -> list[dict]:
        return [dict(m) for m in self.messages]


@dataclass
class Suite:
    name: str
    kind: str
    items: list[SuiteItem]
    path: str = ""
    digest: str = ""
    """sha256 of the file's bytes (or of the generated items)."""
    baseline: str = "base"
    """`regression`: what the drop is measured against, `base` or `champion` (SuiteConfig.baseline)."""
    options: dict = field(default_factory=dict)
    """The suite's own thresholds (min_gain, max_drop, min_score; None: validation's defaults)."""


@dataclass
class SuiteScore:
    """One suite in the ValidationReport: each model's mean score and whether the gate's rule held."""
    name: str
    kind: str
    num_items: int
    candidate: float
    champion: float
    base: float | None = None
    """Regression suites: the original base model's score, what forgetting is measured against."""
    passed: bool = False
    reason: str = ""
    samples: list[dict] = field(default_factory=list)


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style token overlap F1 (lower-cased words and numbers)."""
    a, r = (re.findall(r"[\w$.]+", t.lower().rstrip(".")) for t in (answer, reference))
    common = sum((Counter(a) & Counter(r)).values())
    if not a or not r or not common:
        return float(a == r)
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def _normalized(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower().rstrip(".!")


def grade(item: SuiteItem, answer: str, judge: Callable[[SuiteItem, str], float] | None = None) -> float:
    """One answer's score in [0, 1]."""
    g, ref = item.grader, item.reference or ""
    if g == "exact":
        return float(_normalized(answer) == _normalized(ref))
    if g == "contains":
        return float(_normalized(ref) in _normalized(answer))
    if g == "regex":
        return float(re.search(ref, answer, flags=re.IGNORECASE) is not None)
    if g == "token_f1":
        f1 = token_f1(answer, ref)
        return f1 if item.threshold is None else float(f1 >= item.threshold)
    if judge is None:
        raise SuiteError("grader 'judge' needs the teacher as judge (validation.judge); none was given")
    return judge(item, answer)


def mean_score(items: list[SuiteItem], answers: list[str], judge=None) -> float:
    if not items:
        raise SuiteError("an empty suite scores nothing: refusing rather than passing")
    return sum(grade(i, a, judge) for i, a in zip(items, answers, strict=True)) / len(items)


def parse_suite(text: str, where: str, default_grader: str = "token_f1") -> list[SuiteItem]:
    """The items of a suite file's text; every bad line is reported (file:line, field, fix), none skipped."""
    items, problems = [], []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        at = f"{where}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            problems.append(f"{at}: not JSON ({e.msg}); each line must be one JSON object")
            continue
        if not isinstance(row, dict):
            problems.append(f"{at}: a line must be a JSON object with 'messages'")
            continue
        unknown = sorted(set(row) - {"messages", "reference", "grader", "threshold", "id"})
        if unknown:
            problems.append(f"{at}: unknown field(s) {unknown}; allowed: messages, reference, grader, threshold, id")
            continue
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            problems.append(f"{at}: messages: required, a non-empty list of {{role, content}}")
            continue
        bad = [i for i, m in enumerate(msgs) if not isinstance(m, dict) or m.get("role") not in ROLES
               or not isinstance(m.get("content"), str) or set(m) - {"role", "content"}]
        if bad:
            problems.append(f"{at}: messages[{bad[0]}]: must be {{\"role\": one of {list(ROLES)}, \"content\": str}}")
            continue
        grader = row.get("grader", default_grader)
        if grader not in GRADERS:
            problems.append(f"{at}: grader: unknown '{grader}'; use one of {list(GRADERS)}")
            continue
        ref = row.get("reference")
        if ref is not None and not isinstance(ref, str):
            problems.append(f"{at}: reference: must be a string")
            continue
        if grader != "judge" and not ref:
            problems.append(f"{at}: reference: required by grader '{grader}' (only 'judge' may go without)")
            continue
        if grader == "regex":
            try:
                re.compile(ref)
            except re.error as e:
                problems.append(f"{at}: reference: not a valid regular expression ({e})")
                continue
        threshold = row.get("threshold")
        if threshold is not None and (grader != "token_f1" or isinstance(threshold, bool)
                                      or not isinstance(threshold, (int, float)) or not 0 <= threshold <= 1):
            problems.append(f"{at}: threshold: a number in [0, 1], and only with grader 'token_f1'")
            continue
        items.append(SuiteItem(tuple(_frozen(m) for m in msgs), ref, grader,
                               None if threshold is None else float(threshold)))
    if problems:
        raise SuiteError("\n".join(problems))
    if not items:
        raise SuiteError(f"{where}: the suite has no items; an empty suite would pass any model: add lines "
                         "of {\"messages\": [...], \"reference\": ...}")
    return items


class _Message(dict):
    """A message dict that can sit in a frozen dataclass (hashable by its items)."""

    def __hash__(self):
        return hash(tuple(sorted(self.items())))


def _frozen(m: dict) -> _Message:
    return _Message(role=m["role"], content=m["content"])


def load_suite(path: str | Path, name: str, kind: str, default_grader: str = "token_f1") -> Suite:
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{path}: no such suite file; write it (JSONL of {{\"messages\", \"reference\"}}) "
                         "or fix the path (a relative path is taken from the config file's directory)")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SuiteError(f"{path}: not UTF-8 text; a suite is a JSONL file") from None
    return Suite(name, kind, parse_suite(text, str(path), default_grader), str(path),
                 "sha256:" + hashlib.sha256(data).hexdigest())


def write_suite(path: Path, items: list[dict]) -> str:
    """Write suite lines atomically; returns the file's digest."""
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items).encode()
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return "sha256:" + hashlib.sha256(data).hexdigest()


def general_prompts(path: str | None = None) -> list[list[dict]]:
    """The general prompt set the default regression suite asks (shipped: 121 everyday questions and
    requests, nothing model-specific), or the conversations of a user's prompt file."""
    text = Path(path).read_text() if path else \
        resources.files("loop.validate").joinpath("data/general_prompts.jsonl").read_text()
    return [json.loads(line)["messages"] for line in text.splitlines() if line.strip()]


def heldout_suite(rows: list[dict], threshold: float | None = None) -> Suite:
    """The cycle's held-out labelled prompts (never trained on) as a skill suite: agreement with the
    teacher's answers, by token F1."""
    items = [SuiteItem(tuple(_frozen(m) for m in row["messages"]), row["completion"], "token_f1", threshold)
             for row in rows]
    digest = hashlib.sha256(json.dumps([[i.conversation, i.reference] for i in items]).encode()).hexdigest()
    return Suite("heldout-teacher", "skill", items, "", "sha256:" + digest)
