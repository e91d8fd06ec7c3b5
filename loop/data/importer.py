"""`loopctl traces import FILE`: a team's own chat-completion logs into the trace log, as if served.

The whole file is validated first: every problem is reported with its line and field, and if there
is any, nothing is written. Then its records go into one Parquet part of their own beside the
compacted ones, its feedback into a feedback file of its own, and last a row in the ledger
`imports.jsonl`: a file (by its sha256) is imported once. Nothing here goes through the TraceLog
actor or touches its files, so an import is safe while a loop runs on the same storage root.
"""
from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import get_args

import pyarrow as pa
import pyarrow.parquet as pq

from loop.config import LoopConfig
from loop.traces.log import SCHEMA, TraceRecord, read_jsonl, truncate_torn_tail

IMPORTED = "imported"
"""The `source`, `variant` and `model_version` of an imported record: no registered version served it."""
LEDGER = "imports.jsonl"
MAX_TEXT = 256
"""The gateway's limit on `user` and a feedback `label`."""


@dataclass
class ImportProblem:
    line: int | None
    """1-based line of the file; None for the file as a whole."""
    field: str
    message: str

    def __str__(self) -> str:
        return (f"line {self.line}: " if self.line is not None else "") + f"{self.field}: {self.message}"


class ImportRefused(Exception):
    """The file has problems (all of them, in line order); nothing was imported."""

    def __init__(self, problems: list[ImportProblem]):
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


@dataclass
class ImportResult:
    file: str
    digest: str
    """`sha256:<hex>` of the file's bytes: every record's `source_digest`."""
    records: int
    feedback: int
    endpoints: dict[str, int] = field(default_factory=dict)
    """Records per endpoint id."""
    already_imported: bool = False
    """The ledger had this digest: nothing was added."""
    part: str = ""
    feedback_file: str = ""


def file_digest(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def import_request_id(digest: str, line: int) -> str:
    """Deterministic per (file, line): a re-import of the same file names the same records."""
    return "imp-" + hashlib.sha256(f"{digest}:{line}".encode()).hexdigest()[:16]


def chat_prompt(messages: list[dict]) -> str:
    """The messages as the gateway stores a chat request's prompt (`route` in loop/serving/routing.py):
    each validated as a ChatMessage and dumped, so a live and an imported prompt compare equal. A
    logged message's other fields (a response's `refusal`, `annotations`) are not part of the prompt."""
    from loop.serving.protocol import ChatMessage

    keep = {"role", "content", "name"}  # an imported conversation is plain text (tool turns are refused)
    return json.dumps([ChatMessage.model_validate({k: v for k, v in m.items() if k in keep}).as_dict()
                       for m in messages])


@functools.cache
def _roles() -> tuple[str, ...]:
    from loop.serving.protocol import ChatMessage

    # A tool result is not imported: the teacher labels plain conversations.
    return tuple(r for r in get_args(ChatMessage.model_fields["role"].annotation) if r != "tool")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _messages(msgs, where: str, roles: tuple[str, ...], problems: list) -> None:
    if not isinstance(msgs, list) or not msgs:
        problems.append((where, "required: a non-empty list of {role, content} messages"))
        return
    for i, m in enumerate(msgs):
        at = f"{where}[{i}]"
        if not isinstance(m, dict):
            problems.append((at, "must be an object with role and content"))
            continue
        if "role" not in m:
            problems.append((f"{at}.role", "required"))
        elif m["role"] not in roles:
            problems.append((f"{at}.role", f"{m['role']!r} is not one of {', '.join(roles)}"))
        if m.get("tool_calls"):
            problems.append((f"{at}.tool_calls", "a tool-using conversation is not imported: the teacher labels "
                             "plain conversations"))
        if "name" in m and not (isinstance(m["name"], str) and 0 < len(m["name"]) <= 64):
            problems.append((f"{at}.name", "must be a string of 1 to 64 characters"))
        if not isinstance(m.get("content"), str):
            problems.append((f"{at}.content", "required: a string" if "content" not in m
                             else f"must be a string, not {type(m['content']).__name__}"))


def _response(resp, problems: list) -> tuple[str, int, int, str]:
    """The assistant text, token counts (0 when not given) and the response's id."""
    if isinstance(resp, str):
        if not resp.strip():
            problems.append(("response", "the assistant text is empty"))
        return resp, 0, 0, ""
    if not isinstance(resp, dict):
        problems.append(("response", "required: a chat.completion object or the assistant's text"))
        return "", 0, 0, ""
    choices, text = resp.get("choices"), None
    if not isinstance(choices, list) or not choices:
        problems.append(("response.choices", "required: a non-empty list (a chat.completion object); or give "
                                             "the assistant's text as the response"))
    else:
        message = choices[0].get("message") if isinstance(choices[0], dict) else None
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str) or not text.strip():
            problems.append(("response.choices[0].message.content", "no assistant text"))
    tokens = []
    usage = resp.get("usage")
    for key in ("prompt_tokens", "completion_tokens"):
        v = usage.get(key, 0) if isinstance(usage, dict) else 0
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            problems.append((f"response.usage.{key}", "must be a non-negative integer"))
            v = 0
        tokens.append(v)
    rid = resp.get("id")
    return text if isinstance(text, str) else "", tokens[0], tokens[1], rid[:128] if isinstance(rid, str) else ""


def parse_line(obj, line: int, digest: str, endpoints: dict[str, str], default: str | None,
               now: float) -> tuple[dict | None, dict | None, list[ImportProblem]]:
    """One line's trace record and feedback row (None when it has no score or label), or its problems.
    `endpoints`: endpoint id -> tenant id; `default`: the endpoint of lines that name no model."""
    if not isinstance(obj, dict):
        return None, None, [ImportProblem(line, "(line)", "must be a JSON object")]
    problems: list[tuple[str, str]] = []
    src, at = obj, ""
    if "request" in obj:  # the {"request": {...}, "response": {...}} variant
        src, at = obj["request"], "request."
        if not isinstance(src, dict):
            return None, None, [ImportProblem(line, "request", "must be an object with messages")]
    _messages(src.get("messages"), at + "messages", _roles(), problems)
    text, prompt_tokens, completion_tokens, response_id = _response(obj.get("response"), problems)
    model = src.get("model", obj.get("model"))
    endpoint = default
    if model is not None:
        named = model.removeprefix("model-") if isinstance(model, str) else None
        if named not in endpoints:
            problems.append((at + "model" if "model" in src else "model",
                             f"{model!r} is not an endpoint of this config (one of "
                             f"{', '.join('model-' + e for e in endpoints)})"))
        endpoint = named
    elif default is None:
        problems.append(("model", f"missing, and no --endpoint says which of the config's {len(endpoints)} "
                                  "endpoints"))
    user = src.get("user", obj.get("user"))
    if user is not None and (not isinstance(user, str) or len(user) > MAX_TEXT):
        problems.append((at + "user" if "user" in src else "user",
                         f"must be a string of at most {MAX_TEXT} characters"))
    score, label, created = obj.get("score"), obj.get("label"), obj.get("created")
    if score is not None and not (_number(score) and 0 <= score <= 1):
        problems.append(("score", f"must be a number in [0, 1], not {score!r}"))
    if label is not None and (not isinstance(label, str) or len(label) > MAX_TEXT):
        problems.append(("label", f"must be a string of at most {MAX_TEXT} characters"))
    if created is not None and not (_number(created) and created > 0):
        problems.append(("created", f"must be a unix timestamp (seconds), not {created!r}"))
    if problems:
        return None, None, [ImportProblem(line, f, m) for f, m in problems]
    request_id, ts = import_request_id(digest, line), float(created if created is not None else now)
    record = asdict(TraceRecord(
        request_id=request_id, tenant=endpoints[endpoint], endpoint=endpoint, variant=IMPORTED,
        model_version=IMPORTED, user=user or "", prompt=chat_prompt(src["messages"]), completion=text,
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, status=200,
        client_request_id=response_id, source=IMPORTED, source_digest=digest, ts=ts))
    feedback = None
    if score is not None or label is not None:
        feedback = {"request_id": request_id, "tenant": endpoints[endpoint],
                    "score": None if score is None else float(score), "label": label, "ts": ts}
    return record, feedback, []


def parse_file(path: str | Path, digest: str, endpoints: dict[str, str], default: str | None = None,
               now: float | None = None) -> tuple[list[dict], list[dict], list[ImportProblem]]:
    """Every line's record and feedback row, and every problem of the file (blank lines are skipped)."""
    now = time.time() if now is None else now
    records, feedback, problems = [], [], []
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as e:
                problems.append(ImportProblem(n, "(line)", f"not UTF-8 ({e.reason} at byte {e.start})"))
                continue
            if not text:
                continue
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                problems.append(ImportProblem(n, "(line)", f"not JSON: {e.msg} at column {e.colno}"))
                continue
            rec, fb, bad = parse_line(obj, n, digest, endpoints, default, now)
            problems += bad
            if rec is not None:
                records.append(rec)
            if fb is not None:
                feedback.append(fb)
    if not records and not problems:
        problems.append(ImportProblem(None, "file", "no records: every line is blank"))
    return records, feedback, problems


def imports(traces_root: str | Path) -> dict[str, dict]:
    """The ledger: every imported file's row, by digest."""
    path = Path(traces_root) / LEDGER
    # A torn last row (a crash while appending it) is skipped: that import finishes when run again.
    return {r["digest"]: r for r in read_jsonl(path)} if path.exists() else {}


def import_file(cfg: LoopConfig, path: str | Path, endpoint: str | None = None,
                now: float | None = None) -> ImportResult:
    """Import `path` into `cfg`'s trace log; raises ImportRefused (nothing written) on any problem.
    `endpoint` (model-<id> or <id>): for lines that name no model; the default is the config's only
    endpoint, when it has one."""
    path = Path(path)
    endpoints = {e.id: t.id for t, e in cfg.endpoints()}
    default = endpoint.removeprefix("model-") if endpoint else (next(iter(endpoints)) if len(endpoints) == 1 else None)
    if default is not None and default not in endpoints:
        raise ImportRefused([ImportProblem(None, "--endpoint", f"model-{default} is not an endpoint of {cfg.name} "
                                           f"(one of {', '.join('model-' + e for e in endpoints)})")])
    digest = file_digest(path)
    root = cfg.storage.path("traces")
    hexd = digest.split(":")[1]
    part = root / "parquet" / f"part-import-{hexd}.parquet"
    feedback_file = root / f"feedback-import-{hexd}.jsonl"
    with _ledger_lock(root) as ledger:
        done = imports(root).get(digest)
        if done:
            return ImportResult(str(path), digest, 0, 0, already_imported=True, part=done.get("part", ""),
                                feedback_file=done.get("feedback_file", ""))
        records, feedback, problems = parse_file(path, digest, endpoints, default, now)
        if problems:
            raise ImportRefused(problems)
        if part.exists():
            # A crash after the part, before the ledger: keep it (and its import time for rows without
            # `created`), so the feedback written now joins the records as they are on disk.
            written = pq.read_table(part, columns=["request_id", "ts"]).to_pydict()
            ts = dict(zip(written["request_id"], written["ts"]))
            for row in feedback:
                row["ts"] = ts.get(row["request_id"], row["ts"])
        else:
            _write_atomic(part, lambda tmp: pq.write_table(pa.Table.from_pylist(records, schema=SCHEMA), tmp))
        if feedback and not feedback_file.exists():
            text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in feedback)
            _write_atomic(feedback_file, lambda tmp: tmp.write_text(text, encoding="utf-8"))
        result = ImportResult(str(path), digest, len(records), len(feedback),
                              dict(Counter(r["endpoint"] for r in records)), part=str(part),
                              feedback_file=str(feedback_file) if feedback else "")
        row = {k: v for k, v in asdict(result).items() if k != "already_imported"}
        ledger.write(json.dumps({**row, "imported_at": time.time()}) + "\n")
        ledger.flush()
        os.fsync(ledger.fileno())
    return result


@contextmanager
def _ledger_lock(root: Path):
    """The ledger, open for appending and locked: two imports of one file cannot both write it."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / LEDGER, "a", encoding="utf-8") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            truncate_torn_tail(root / LEDGER)
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_atomic(path: Path, write) -> None:
    """`write(tmp)`, fsync, then rename into place: readers see the whole file or none of it. The
    temporary name starts with a dot and ends in .tmp, so no reader's glob picks it up."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
