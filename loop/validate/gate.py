"""The validation gate: the candidate must not be worse than the champion on held-out current facts.

Both are scored the same way (greedy Hugging Face generation on the world's held-out phrasings), so
the comparison is fair whatever serves them. Serving parity and regression sets come with the
validation issue.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loop.config import ValidationConfig
from loop.sim.world import Fact, is_correct


@dataclass
class ValidationReport:
    candidate_acc: float
    champion_acc: float
    num_questions: int
    min_accuracy_gain: float
    passed: bool
    seconds: float
    reasons: list[str] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def generate_answers(model_dir: Path, questions: list[str], max_new_tokens: int, adapter_dir: str | None = None,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers from a model directory (optionally with a LoRA adapter on top)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loop.models.chat import greedy_answers, left_padded_tokenizer

    tok = left_padded_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    return greedy_answers(model, tok, [[{"role": "user", "content": q}] for q in questions], max_new_tokens,
                          batch_size=batch_size)


def accuracy(facts: list[Fact], answers: list[str]) -> float:
    return sum(is_correct(f, a) for f, a in zip(facts, answers)) / max(1, len(facts))


class Validator:
    def __init__(self, cfg: ValidationConfig):
        self.cfg = cfg

    def run(self, candidate_dir: Path, champion_base: Path, champion_adapter: str | None,
            facts: list[Fact]) -> ValidationReport:
        started = time.perf_counter()
        questions = [f.heldout_question() for f in facts]
        cand = generate_answers(candidate_dir, questions, self.cfg.max_new_tokens)
        champ = generate_answers(champion_base, questions, self.cfg.max_new_tokens, champion_adapter)
        cand_acc, champ_acc = accuracy(facts, cand), accuracy(facts, champ)
        reasons = []
        if cand_acc - champ_acc < self.cfg.min_accuracy_gain:
            reasons.append(f"held-out accuracy {cand_acc:.3f} vs champion {champ_acc:.3f}: gain below "
                           f"validation.min_accuracy_gain {self.cfg.min_accuracy_gain}")
        return ValidationReport(
            candidate_acc=cand_acc, champion_acc=champ_acc, num_questions=len(facts),
            min_accuracy_gain=self.cfg.min_accuracy_gain, passed=not reasons,
            seconds=time.perf_counter() - started, reasons=reasons,
            samples=[{"question": q, "expected": f.value, "candidate": c, "champion": h}
                     for q, f, c, h in list(zip(questions, facts, cand, champ))[:5]])
