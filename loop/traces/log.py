"""The trace log: every served request as one TraceRecord, write-ahead JSONL first, Parquet after.

`append` returns only after the record is fsynced to the write-ahead log, so an acknowledged record
survives a crash. `compact` seals the log segment, writes it as one Parquet part and then deletes the
segment; a crash between the two is repaired on the next start (a sealed segment whose part exists is
deleted, otherwise it is compacted). Readers see Parquet parts plus whatever is not compacted yet.
This is a plain class; the driver runs it as one named Ray actor.
"""
from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq


@dataclass
class TraceRecord:
    request_id: str
    tenant: str
    endpoint: str
    variant: str
    """`champion` or `challenger` (or `teacher` when the cascade escalated)."""
    model_version: str
    """Registered-model version that served the request (`student-<endpoint>/<n>`)."""
    adapter_digest: str = ""
    checkpoint_digest: str = ""
    training_run_id: str = ""
    deployed_at: str = ""
    user: str = ""
    prompt: str = ""
    """The chat messages as JSON."""
    tools: str = ""
    """The tools the request offered, with its tool_choice, as JSON ("" for none)."""
    completion: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_ms: float = 0.0
    ttft_ms: float = 0.0
    escalated: bool = False
    """The cascade replaced a low-confidence student answer with the teacher's (`completion`)."""
    student_completion: str = ""
    """What the student said when the request was escalated."""
    confidence: float = 0.0
    """Mean token log-probability of the student's answer (0 when not measured)."""
    status: int = 200
    error: str = ""
    client_request_id: str = ""
    """The `x-request-id` the client sent, if any; `request_id` is always the gateway's own (unique),
    so one tenant can never name another tenant's request."""
    source: str = "live"
    """`live` (served by the gateway) or `imported` (`loopctl traces import`)."""
    source_digest: str = ""
    """For imported records: the sha256 of the file they came from."""
    ts: float = field(default_factory=time.time)


# Field annotations are strings here (`from __future__ import annotations`).
_ARROW = {"str": pa.string(), "int": pa.int64(), "float": pa.float64(), "bool": pa.bool_()}
SCHEMA = pa.schema([(f.name, _ARROW[f.type]) for f in fields(TraceRecord)])


EVAL_USER = "loop-eval"
"""User-id prefix of evaluation traffic (a client's own test requests, the demo's accuracy checks):
traced like any request, but never selected for training nor counted as a canary outcome."""


def tool_traffic(record: dict) -> bool:
    """A record of a tool-using conversation: tools offered, or a tool call or its result among the
    messages. The teacher and the judge are asked plain conversations, so the loop neither labels nor
    grades these; they are served and traced like any request."""
    if record.get("tools"):
        return True
    prompt = record.get("prompt") or ""
    if '"tool' not in prompt:
        return False
    try:
        messages = json.loads(prompt)
    except ValueError:
        return False
    return isinstance(messages, list) and any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                              for m in messages)


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex


class TraceLog:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._wal_path = self.root / "wal.jsonl"
        self._recover()
        truncate_torn_tail(self._wal_path)
        self._wal = open(self._wal_path, "a", encoding="utf-8")
        truncate_torn_tail(self.root / "feedback.jsonl")
        self._feedback = open(self.root / "feedback.jsonl", "a", encoding="utf-8")

    def append_feedback(self, rows: list[dict]) -> int:
        """Durably append outcome labels ({request_id, tenant, score, label, ts}); joined by request id."""
        self._feedback.write("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        self._feedback.flush()
        os.fsync(self._feedback.fileno())
        return len(rows)

    def append(self, records: list[dict]) -> int:
        """Durably append records (dicts with TraceRecord's fields); returns how many."""
        lines = "".join(json.dumps(asdict(TraceRecord(**r)), ensure_ascii=False) + "\n" for r in records)
        self._wal.write(lines)
        self._wal.flush()
        os.fsync(self._wal.fileno())
        return len(records)

    def compact(self) -> int:
        """Move everything in the write-ahead log into a Parquet part; returns rows moved."""
        if self._wal_path.stat().st_size == 0:
            return 0
        self._wal.close()
        sealed = self.root / f"wal-{time.time_ns()}.sealed"
        self._wal_path.rename(sealed)
        self._wal = open(self._wal_path, "a", encoding="utf-8")
        return self._compact_segment(sealed)

    def parts_dir(self) -> Path:
        return self.root / "parquet"

    def _compact_segment(self, sealed: Path) -> int:
        rows = read_jsonl(sealed)
        part = self.parts_dir() / f"part-{sealed.stem.split('-')[1]}.parquet"
        if rows and not part.exists():
            part.parent.mkdir(parents=True, exist_ok=True)
            tmp = part.with_suffix(".tmp")
            pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), tmp)
            os.replace(tmp, part)
        sealed.unlink()
        return len(rows)

    def _recover(self) -> None:
        for sealed in sorted(self.root.glob("wal-*.sealed")):
            self._compact_segment(sealed)


def truncate_torn_tail(path: Path) -> None:
    """Cut a crash's partial last line (never acknowledged), so the next record starts on a new line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        data = f.read()
        if not data.endswith(b"\n"):
            f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                # Only the very last line can be torn (a crash mid-write, never acknowledged).
                continue
    return rows


def read_feedback(root: str | Path) -> list[dict]:
    """Every outcome label: the gateway's (`feedback.jsonl`), then each imported file's
    (`feedback-import-<digest>.jsonl`, written whole by `loopctl traces import`, never appended to)."""
    root = Path(root)
    paths = [root / "feedback.jsonl"] + sorted(root.glob("feedback-import-*.jsonl"))
    return [row for path in paths if path.exists() for row in read_jsonl(path)]


def read_traces(root: str | Path) -> list[dict]:
    """Every record, compacted or not (imported files' parts, `part-import-*`, included), oldest first;
    a record seen twice (compacted and still in a segment after a crash) is returned once. Clients may
    reuse a request id, so the key includes ts."""
    root = Path(root)
    rows: list[dict] = []
    parts = sorted((root / "parquet").glob("part-*.parquet"))
    for part in parts:
        rows += pq.read_table(part).to_pylist()
    for seg in sorted(root.glob("wal-*.sealed")) + [root / "wal.jsonl"]:
        if seg.exists():
            rows += read_jsonl(seg)
    seen, out = set(), []
    for r in sorted(rows, key=lambda r: r["ts"]):
        key = (r["request_id"], r["ts"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out
