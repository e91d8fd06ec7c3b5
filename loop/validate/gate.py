"""The validation gate: nothing worse than the champion, and nothing the teacher would not say, gets past.

Candidate and champion are scored the same way (greedy Hugging Face generation), so the comparison is
fair whatever serves them. Each threshold is in `validation:`:
  - new skill: accuracy on held-out phrasings of the current facts beats the champion's by
    `min_accuracy_gain`;
  - regression: accuracy on earlier facts (unchanged since the last epoch) and general questions the
    student should keep falls by at most `max_regression_drop`;
  - teacher agreement: on held-out labelled prompts (never trained on), the candidate's answers agree
    with the teacher's (mean token F1) at least `min_teacher_agreement`.
A failed check is a reason; every reason is recorded, and any reason means nothing is deployed.
Without a simulated world (`traffic.simulate: false`, no facts to check), the new-skill check is the
teacher agreement on the held-out labels instead: the candidate's must beat the champion's by
`min_accuracy_gain`, and the regression set is the general questions.
"""
from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loop.config import ValidationConfig
from loop.sim.world import GENERAL_QUESTIONS, Fact, is_correct, states


@dataclass
class ValidationReport:
    candidate_acc: float
    champion_acc: float
    num_questions: int
    min_accuracy_gain: float
    passed: bool
    seconds: float
    regression_candidate: float = float("nan")
    regression_champion: float = float("nan")
    num_regression: int = 0
    draft_acceptance: float | None = None
    spec_identical: str = ""
    teacher_agreement: float = float("nan")
    champion_teacher_agreement: float = float("nan")
    num_agreement: int = 0
    parity: dict = field(default_factory=dict)
    reasons: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    reference_answers: list[str] = field(default_factory=list)
    """The candidate's greedy answers to the first validation.parity_questions questions
    (`reference_questions`), which serving parity asks the engines."""
    reference_questions: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def generate_answers(model_dir: Path, questions: list, max_new_tokens: int, adapter_dir: str | None = None,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers from a model directory (optionally with a LoRA adapter on top) to questions
    (strings, one user turn each) or whole conversations (lists of messages)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loop.models.chat import greedy_answers, left_padded_tokenizer

    tok = left_padded_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    conversations = [[{"role": "user", "content": q}] if isinstance(q, str) else q for q in questions]
    return greedy_answers(model, tok, conversations, max_new_tokens, batch_size=batch_size)


def accuracy(facts: list[Fact], answers: list[str]) -> float:
    return sum(is_correct(f, a) for f, a in zip(facts, answers)) / max(1, len(facts))


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style token overlap F1 (lower-cased words and numbers)."""
    a, r = (re.findall(r"[\w$.]+", t.lower().rstrip(".")) for t in (answer, reference))
    common = sum((Counter(a) & Counter(r)).values())
    if not a or not r or not common:
        return float(a == r)
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


class Validator:
    def __init__(self, cfg: ValidationConfig):
        self.cfg = cfg

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

    def run(self, candidate_dir: Path, champion_base: Path, champion_adapter: str | None, facts: list[Fact],
            earlier: set[str] | None = None, heldout: list[dict] | None = None, draft_dir: str | None = None,
            draft_acceptance: float | None = None) -> ValidationReport:
        """`facts`: the current world; `earlier`: entities whose facts did not change since the last
        epoch; `heldout`: labelled rows ({"messages", "completion"}) set aside from training;
        `draft_dir` / `draft_acceptance`: the version's matched draft and its measured acceptance."""
        started = time.perf_counter()
        heldout = heldout or []
        questions = ([f.heldout_question() for f in facts] + [q for q, _ in GENERAL_QUESTIONS]
                     + [row["messages"] for row in heldout])
        cand = generate_answers(candidate_dir, questions, self.cfg.max_new_tokens)
        champ = generate_answers(champion_base, questions, self.cfg.max_new_tokens, champion_adapter)
        n, g = len(facts), len(GENERAL_QUESTIONS)
        report = ValidationReport(candidate_acc=accuracy(facts, cand[:n]), champion_acc=accuracy(facts, champ[:n]),
                                  num_questions=n, min_accuracy_gain=self.cfg.min_accuracy_gain, passed=False,
                                  seconds=0.0)
        if not facts and heldout:  # real traffic: the held-out teacher labels are the new skill
            report.candidate_acc, report.champion_acc = (
                sum(token_f1(x, row["completion"]) for x, row in zip(a[g:], heldout)) / len(heldout)
                for a in (cand, champ))
            report.num_questions = len(heldout)
        if report.candidate_acc - report.champion_acc < self.cfg.min_accuracy_gain:
            report.reasons.append(f"held-out accuracy {report.candidate_acc:.3f} vs champion {report.champion_acc:.3f}: "
                                  f"gain below validation.min_accuracy_gain {self.cfg.min_accuracy_gain}")
        kept = [i for i, f in enumerate(facts) if f.entity in (earlier or set())]
        report.num_regression = len(kept) + g
        report.regression_candidate, report.regression_champion = (
            (sum(is_correct(facts[i], a[i]) for i in kept)
             + sum(states(v, x) for (_, v), x in zip(GENERAL_QUESTIONS, a[n:n + g]))) / report.num_regression
            for a in (cand, champ))
        drop = report.regression_champion - report.regression_candidate
        if drop > self.cfg.max_regression_drop:
            report.reasons.append(f"regression set (earlier facts and general questions) accuracy fell "
                                  f"{report.regression_champion:.3f} -> {report.regression_candidate:.3f}, more than "
                                  f"validation.max_regression_drop {self.cfg.max_regression_drop}")
        if heldout:
            report.num_agreement = len(heldout)
            report.teacher_agreement, report.champion_teacher_agreement = (
                sum(token_f1(x, row["completion"]) for x, row in zip(a[n + g:], heldout)) / len(heldout)
                for a in (cand, champ))
            if report.teacher_agreement < self.cfg.min_teacher_agreement:
                report.reasons.append(f"agreement with the teacher on {len(heldout)} held-out prompts is "
                                      f"{report.teacher_agreement:.3f}, below validation.min_teacher_agreement "
                                      f"{self.cfg.min_teacher_agreement}")
        if draft_dir:
            self._check_draft(report, candidate_dir, draft_dir, draft_acceptance,
                              [q for q in questions if isinstance(q, str)])
        report.passed = not report.reasons
        report.seconds = time.perf_counter() - started
        report.reference_answers = cand[:self.cfg.parity_questions]
        report.reference_questions = questions[:self.cfg.parity_questions]
        report.samples = [{"question": q, "expected": f.value, "candidate": c, "champion": h}
                          for q, f, c, h in list(zip(questions, facts, cand, champ))[:5]]
        return report
