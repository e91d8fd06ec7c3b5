"""The validation gate: nothing worse than the champion, and nothing that forgot what the base knew, gets past.

Candidate and champion answer every evaluation suite (loop/suites.py) the same way (greedy
Hugging Face generation), so the comparison is fair whatever serves them. The rules, each threshold
in `validation:` or the suite's own entry:
  - skill suites (the cycle's held-out teacher labels, and the user's own): the candidate's score must
    beat the champion's by `min_gain` (validation.min_accuracy_gain) and reach `min_score` if set;
  - regression suites (by default one made from the original base model's own answers to general
    prompts): the candidate may fall at most `max_drop` (validation.max_regression_drop) below its
    baseline, the base model (forgetting) or the champion;
  - teacher agreement: on the held-out labels, mean token F1 with the teacher's answers at least
    `min_teacher_agreement`;
  - the draft: acceptance and identical speculative output.
Nothing passes vacuously: a gate without any skill suite, or with an empty or unreadable one, refuses
the candidate and says why. Every failed rule is a reason; any reason means nothing is deployed.
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loop.config import ValidationConfig
from loop.models.answers import AnswerCache, generate_answers
from loop.suites import (Suite, SuiteError, SuiteScore, general_prompts, heldout_suite, load_suite, mean_score,
                         token_f1, write_suite)

__all__ = ["ValidationReport", "Validator", "token_f1"]

BASE_SUITE = "base-regression"
_EPS = 1e-9
"""Thresholds are compared with this slack: 1 - 38/40 is 0.05000000000000004 in floating point."""
BASE_PASS_F1 = 0.5
"""An answer of the base regression suite passes when its token F1 with the base's own reaches this:
worded differently is kept, a different answer is forgotten."""


@dataclass
class ValidationReport:
    candidate_acc: float
    """The first skill suite's score (the user's own suite, or the held-out teacher labels)."""
    champion_acc: float
    num_questions: int
    min_accuracy_gain: float
    passed: bool
    seconds: float
    regression_candidate: float = float("nan")
    """The first regression suite's score (the base regression suite unless one is named)."""
    regression_champion: float = float("nan")
    regression_base: float = float("nan")
    num_regression: int = 0
    draft_acceptance: float | None = None
    spec_identical: str = ""
    teacher_agreement: float = float("nan")
    champion_teacher_agreement: float = float("nan")
    num_agreement: int = 0
    suites: dict = field(default_factory=dict)
    """Per suite (by name): SuiteScore as a dict: kind, items, candidate / champion / base scores, verdict."""
    judge: dict = field(default_factory=dict)
    """The judge grader's calls, tokens and cost (empty when no suite used it)."""
    parity: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    reference_answers: list[str] = field(default_factory=list)
    """The candidate's greedy answers to the first validation.parity_questions questions
    (`reference_questions`), which serving parity asks the engines."""
    reference_questions: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def base_suite(cfg: ValidationConfig, base_dir: Path, base_digest: str, root: Path | None) -> Suite:
    """The base regression suite: the original base model's own greedy answers to the general prompts,
    made once per (base, prompt set, max_new_tokens) and kept as a suite file under `root`."""
    prompts = general_prompts(cfg.regression_prompts)
    key = hashlib.sha256(json.dumps([base_digest, prompts, cfg.max_new_tokens]).encode()).hexdigest()[:16]
    path = (root or base_dir.parent) / f"{BASE_SUITE}-{key}.jsonl"
    if not path.exists():
        answers = generate_answers(base_dir, prompts, cfg.max_new_tokens)
        write_suite(path, [{"messages": p, "reference": a, "grader": "token_f1", "threshold": BASE_PASS_F1}
                           for p, a in zip(prompts, answers)])
    return load_suite(path, BASE_SUITE, "regression")


class Validator:
    def __init__(self, cfg: ValidationConfig, root: Path | None = None, judge=None):
        """`root`: where base suites and cached answers live (storage.root/suites; None: nothing kept);
        `judge`: the `judge` grader (a TeacherJudge), when a suite uses it."""
        self.cfg, self.root, self.judge = cfg, root, judge
        self.cache = AnswerCache(root / "answers" if root else None)

    def _check_draft(self, report: ValidationReport, candidate_dir: Path, draft_dir: str,
                     acceptance: float | None, questions: list[str]) -> None:
        from loop.train.draft import assisted_generation

        report.draft_acceptance = acceptance
        if acceptance is not None and acceptance < self.cfg.min_draft_acceptance:
            report.reasons.append(f"the draft's acceptance {acceptance:.3f} tokens per step is below "
                                  f"validation.min_draft_acceptance {self.cfg.min_draft_acceptance}")
        n = self.cfg.spec_check_questions
        if n:
            got = assisted_generation(candidate_dir, draft_dir, questions[:n], self.cfg.max_new_tokens)
            report.spec_identical = got["identical_outputs"]
            if got["identical"] != got["compared"]:
                report.reasons.append(f"speculative decoding with the draft changed the greedy output on "
                                      f"{got['compared'] - got['identical']} of {got['compared']} questions")

    def run(self, candidate_dir: Path, base_dir: Path, champion_adapter: str | None, suites: list[Suite],
            heldout: list[dict] | None = None, draft_dir: str | None = None, draft_acceptance: float | None = None,
            refused: list[str] | None = None, candidate_key: str | None = None,
            champion_key: str | None = None) -> ValidationReport:
        """`suites`: the configured (and any driver-written) suites, loaded; `heldout`: labelled rows
        ({"messages", "completion"}) set aside from training; `champion_adapter`: None when the champion
        is the base itself; `refused`: suites that could not be loaded (each a reason); `candidate_key` /
        `champion_key`: their adapter digests, under which answers are kept (the candidate's then serve
        it as champion)."""
        from loop.models.digest import dir_digest

        started = time.perf_counter()
        heldout = heldout or []
        suites = list(suites)
        if heldout:
            # With a skill suite of its own (the user's, the demo world's), the held-out labels are
            # checked as agreement with the teacher only; alone, they are the new skill itself.
            held = heldout_suite(heldout)
            held.options = {"agreement_only": any(s.kind == "skill" for s in suites)}
            suites.append(held)
        base_digest = dir_digest(base_dir)
        if self.cfg.base_regression:
            suites.append(base_suite(self.cfg, base_dir, base_digest, self.root))
        report = ValidationReport(candidate_acc=float("nan"), champion_acc=float("nan"), num_questions=0,
                                  min_accuracy_gain=self.cfg.min_accuracy_gain, passed=False, seconds=0.0,
                                  reasons=list(refused or []))
        if not any(s.kind == "skill" for s in suites):
            report.reasons.append("no skill suite to measure what the cycle taught: set data.heldout_fraction > 0 "
                                  "(held-out teacher labels) or name a skill suite in validation.suites")
        items = list(dict.fromkeys(i for s in suites for i in s.items))
        conversations = [i.conversation for i in items]
        n = self.cfg.max_new_tokens
        candidate = self.cache.answers(candidate_key and f"adapter:{base_digest}:{candidate_key}", conversations, n,
                                       lambda c: generate_answers(candidate_dir, c, n))
        if champion_adapter:
            champion_key = champion_key and f"adapter:{base_digest}:{champion_key}"
        else:
            champion_key = f"base:{base_digest}"
        champion = self.cache.answers(champion_key, conversations, n,
                                      lambda c: generate_answers(base_dir, c, n, champion_adapter))
        by_item = {"candidate": dict(zip(items, candidate)), "champion": dict(zip(items, champion))}
        base_needed = [i for s in suites if s.kind == "regression" and s.name != BASE_SUITE
                       and s.baseline == "base" for i in s.items]
        if base_needed:
            base_items = list(dict.fromkeys(base_needed))
            by_item["base"] = dict(zip(base_items, self.cache.answers(
                f"base:{base_digest}", [i.conversation for i in base_items], n,
                lambda c: generate_answers(base_dir, c, n))))
        for suite in suites:
            self._score(report, suite, by_item)
        if heldout:
            s = report.suites["heldout-teacher"]
            report.num_agreement = s["num_items"]
            report.teacher_agreement, report.champion_teacher_agreement = s["candidate"], s["champion"]
            if report.teacher_agreement < self.cfg.min_teacher_agreement:
                report.reasons.append(f"agreement with the teacher on {len(heldout)} held-out prompts is "
                                      f"{report.teacher_agreement:.3f}, below validation.min_teacher_agreement "
                                      f"{self.cfg.min_teacher_agreement}")
        singles = [i.conversation[-1]["content"] for i in items if len(i.messages) == 1]
        if draft_dir:
            self._check_draft(report, candidate_dir, draft_dir, draft_acceptance, singles)
        if self.judge is not None and self.judge.usage.calls:
            report.judge = asdict(self.judge.usage)
        report.passed = not report.reasons
        report.seconds = time.perf_counter() - started
        report.reference_questions = conversations[:self.cfg.parity_questions]
        report.reference_answers = candidate[:self.cfg.parity_questions]
        report.samples = [{"question": i.conversation[-1]["content"], "expected": i.reference,
                           "candidate": by_item["candidate"][i], "champion": by_item["champion"][i]}
                          for i in items[:5]]
        return report

    def _score(self, report: ValidationReport, suite: Suite, by_item: dict) -> None:
        """One suite's scores and its rule; the first skill and regression suites fill the headline fields."""
        def mean(who: str) -> float:
            return mean_score(suite.items, [by_item[who][i] for i in suite.items], self.judge)

        got = SuiteScore(suite.name, suite.kind, len(suite.items), mean("candidate"), mean("champion"))
        opts = suite.options
        if suite.kind == "skill" and opts.get("agreement_only"):
            pass  # min_teacher_agreement below
        elif suite.kind == "skill":
            gain = opts.get("min_gain")
            gain = self.cfg.min_accuracy_gain if gain is None else gain
            if got.candidate - got.champion < gain - _EPS:
                got.reason = (f"suite {suite.name}: {got.candidate:.3f} vs champion {got.champion:.3f}: gain below "
                              f"{'its min_gain' if opts.get('min_gain') is not None else 'validation.min_accuracy_gain'} "
                              f"{gain}")
            if report.num_questions == 0:
                report.candidate_acc, report.champion_acc = got.candidate, got.champion
                report.num_questions = got.num_items
        else:
            baseline = suite.baseline
            if suite.name == BASE_SUITE:
                got.base = 1.0  # the base's own answers: it agrees with itself on every one
            elif baseline == "base":
                got.base = mean("base")
            reference = got.base if baseline == "base" else got.champion
            drop = opts.get("max_drop")
            drop = self.cfg.max_regression_drop if drop is None else drop
            if reference - got.candidate > drop + _EPS:
                got.reason = (f"suite {suite.name}: {got.candidate:.3f}, more than "
                              f"{'its max_drop' if opts.get('max_drop') is not None else 'validation.max_regression_drop'} "
                              f"{drop} below the {baseline}'s {reference:.3f}")
            if report.num_regression == 0:
                report.regression_candidate, report.regression_champion = got.candidate, got.champion
                report.regression_base = got.base if got.base is not None else float("nan")
                report.num_regression = got.num_items
        floor = opts.get("min_score")
        if floor is not None and got.candidate < floor - _EPS:
            got.reason = "; ".join(filter(None, [got.reason, f"suite {suite.name}: {got.candidate:.3f} below its "
                                                                f"min_score {floor}"]))
        got.passed = not got.reason
        if got.reason:
            report.reasons.append(got.reason)
        got.samples = [{"question": i.conversation[-1]["content"], "reference": i.reference,
                        "candidate": by_item["candidate"][i]} for i in suite.items[:3]]
        report.suites[suite.name] = asdict(got)


def configured_suites(cfg: ValidationConfig, root: Path, cycle: int) -> tuple[list[Suite], list[str]]:
    """The suites named in `validation.suites`, their `{root}` / `{cycle}` filled in, with their rules
    attached; and, for those that cannot be read, the reason each is a refusal (never skipped)."""
    loaded, refused = [], []
    for s in cfg.suites:
        path = s.path.replace("{root}", str(root)).replace("{cycle}", f"{cycle:04d}")
        try:
            suite = load_suite(path, s.name, s.kind, s.grader)
        except SuiteError as e:
            refused.append(f"suite {s.name} (validation.suites): {e}")
            continue
        suite.baseline, suite.options = s.baseline, {"min_gain": s.min_gain, "max_drop": s.max_drop,
                                                     "min_score": s.min_score}
        loaded.append(suite)
    return loaded, refused


def uses_judge(suites: list[Suite]) -> bool:
    return any(i.grader == "judge" for s in suites for i in s.items)

