"""What each stage of a cycle hands the next, typed, and what it leaves on disk as its `result.json`.

A result is a dataclass: the fields later stages, the report and the canary read, plus `extra` for
the figures only MLflow and people read (a stage's metrics, the simulation's own numbers), and
`record`, which the cycle's stage runner fills (seconds, wall-clock start and end, the manifest of
output digests a resume checks). On disk a result is one flat JSON object: its fields, its `extra`
beside them, and the record as `_seconds`, `_started_at`, `_ended_at`, `_manifest`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, TypeVar

NAN = float("nan")
R = TypeVar("R")


@dataclass
class StageRecord:
    seconds: float = 0.0
    started_at: float | None = None
    ended_at: float | None = None
    manifest: dict = field(default_factory=dict)
    """Output file or directory -> its digest when the stage finished."""


@dataclass
class TrafficResult:
    """What arrived since the last cycle (real traffic), or the demo's round of users."""
    requests: int
    served_by: str
    eval_acc: float = NAN
    teacher_acc: float = NAN
    since: float | None = None
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


@dataclass
class LabelResult:
    """The labelled training set (train.jsonl, heldout.jsonl beside it) and what it cost."""
    dataset: str
    dataset_digest: str
    selected: int
    labelled: int
    cutoff: float
    """The newest live trace read: the next cycle starts after it."""
    replay: str
    replayed: int = 0
    kept: int = 0
    """Answers users rated good, trained on as they were (no teacher call)."""
    label_failed: int = 0
    imports: list[str] = field(default_factory=list)
    live_traces: int = 0
    imported_traces: int = 0
    teacher_cost_usd: float = 0.0
    teacher_cached: int = 0
    """Labels that cost no call: the teacher cache's, and the cascade's escalations (`from_escalation`)."""
    from_escalation: int = 0
    teacher_tokens: int = 0
    teacher_prompt_tokens: int = 0
    teacher_completion_tokens: int = 0
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None

    @property
    def heldout(self) -> Path:
        return Path(self.dataset).parent / "heldout.jsonl"


@dataclass
class TrainResult:
    adapter_dir: str
    adapter_digest: str
    parent: dict
    """The champion the adapter was warm-started from (its version info)."""
    run_id: str
    metrics: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


@dataclass
class MergeResult:
    """The MergeReport's verdict and where the merged weights are (the report's other figures in `extra`)."""
    passed: bool
    reasons: list[str]
    merged_dir: str = ""
    merged_digest: str = ""
    run_id: str = ""
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


@dataclass
class DraftResult:
    """The draft this version ships with: co-trained, or the parent's when it was accepted more."""
    draft_path: str
    draft_digest: str
    cotrained: bool = False
    acceptance: float | None = None
    """Expected tokens accepted per step of k (None: draft co-training is off): the kept draft's."""
    acceptance_stale: float | None = None
    """The parent version's draft on the new student."""
    acceptance_cotrained: float | None = None
    k: int | None = None
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


@dataclass
class ValidationResult:
    """The gate's verdict (the ValidationReport's figures in `extra`)."""
    passed: bool
    reasons: list[str] = field(default_factory=list)
    candidate_acc: float = NAN
    champion_acc: float = NAN
    teacher_agreement: float = NAN
    suites: dict = field(default_factory=dict)
    judge: dict = field(default_factory=dict)
    parity: dict = field(default_factory=dict)
    """Serving parity: the engines' greedy answers against the gate's reference (loop/validate/parity.py);
    `merged_identical` is the merge's proof 4, run here with one engine start."""
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


@dataclass
class RegisterResult:
    """The registered version (the registry's version info)."""
    version: str
    number: int
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


@dataclass
class DeployResult:
    role: str
    """champion, or challenger (a canary)."""
    deployed_at: str
    challenger_weight: float
    reconcile_seconds: float
    extra: dict = field(default_factory=dict)
    """The role's rollout entry, under the role's name."""
    record: StageRecord | None = None


@dataclass
class CanaryResult:
    decision: str
    """promote, rollback, or continue (still collecting evidence when the stage ended)."""
    reasons: list[str]
    p_better: float = NAN
    rounds: int = 0
    requests: int = 0
    first_canary_request_ts: float | None = None
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


@dataclass
class EvaluateResult:
    served_by: str
    eval_acc: float = NAN
    static_acc: float = NAN
    regression_acc: float = NAN
    static_regression_acc: float = NAN
    extra: dict = field(default_factory=dict)
    record: StageRecord | None = None


def read_result(cycle_dir: Path, stage: str, kind: Callable[..., R]) -> R | None:
    """The result a finished stage of the cycle in `cycle_dir` wrote, or None (not run, or not yet)."""
    import json

    path = cycle_dir / stage / "result.json"
    return from_json(kind, json.loads(path.read_text())) if path.exists() else None


def to_json(result) -> dict:
    """The result as its result.json holds it: one flat object."""
    data = asdict(result)
    extra, record = data.pop("extra"), data.pop("record")
    out = {**extra, **data}
    if record:
        out.update({f"_{k}": v for k, v in record.items()})
    return out


def from_json(cls: Callable[..., R], data: dict) -> R:
    """A result of type `cls` from its flat JSON (or any dict a stage computed): its fields by name,
    the rest (but the record's underscored keys) into `extra`."""
    names = {f.name for f in fields(cls)} - {"extra", "record"}
    record = {k[1:]: v for k, v in data.items() if k in ("_seconds", "_started_at", "_ended_at", "_manifest")}
    return cls(**{k: v for k, v in data.items() if k in names},
               extra={k: v for k, v in data.items() if k not in names and not k.startswith("_")},
               record=StageRecord(**record) if record else None)
