"""What a cycle tells: its report (stage by stage, the accuracies before and after) and the one
error a user can act on."""
from __future__ import annotations

from dataclasses import dataclass, field


class CycleFailed(RuntimeError):
    """A cycle stopped for a reason the user can act on; the message says which and how."""


@dataclass
class CycleReport:
    endpoint: str
    cycle: int
    epoch: int
    student_acc_before: float = 0.0
    """The champion at the cycle's start, on the held-out phrasings of the current (drifted) facts."""
    student_acc_after: float = 0.0
    """The champion at the cycle's end (the new version, if it was promoted), on the same questions."""
    teacher_acc: float = 0.0
    static_acc: float = float("nan")
    """The static snapshot (version 1, the base student, never updated) on the same questions."""
    regression_acc: float = float("nan")
    """The champion at the cycle's end on the general questions the base answers right."""
    base_regression_acc: float = float("nan")
    served_before: str = ""
    served_after: str = ""
    new_version: str | None = None
    validation_passed: bool = False
    run_id: str = ""
    promotion: str = ""
    """The promotion controller's verdict on the new version: promote, rollback, or continue
    (still collecting evidence when the canary stage ended)."""
    suites: dict = field(default_factory=dict)
    """The gate's evaluation suites: per name, kind, candidate / champion / base scores and verdict."""
    teacher_agreement: float = float("nan")
    """The candidate's mean token F1 with the teacher on held-out labelled prompts (nan: none held out)."""
    teacher_cost_usd: float = 0.0
    """What the cycle paid the teacher: labels (and the judge's grades)."""
    stage_seconds: dict = field(default_factory=dict)
    stage_clock: dict = field(default_factory=dict)
    """Checkpoint written (train stage done) -> first canary request served, and each stage's share."""
    notes: list[str] = field(default_factory=list)
