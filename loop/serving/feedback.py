"""What `POST /v1/feedback` accepts: a valid body, naming a request of the caller's own tenant.

Feedback steers promotions and training data, so a tenant may only grade its own requests: the
request id must be in the trace log with the caller's tenant. `RequestOwners` answers for the
requests a gateway replica traced itself; `holds_request` reads the trace log's files for the rest
(a request another replica served, or one served before this replica started). Not the HTTP route
itself (the gateway's) nor the joins of feedback to traces (`loop.control`, `loop.data.select`).
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

from loop.serving.errors import BadRequest
from loop.serving.protocol import json_body

MAX_LABEL = 256


def parse_feedback(body: bytes) -> tuple[str, float | None, str | None]:
    """`{"request_id": str, "score": number in [0, 1]?, "label": str?}` (a score or a label, or both)
    -> (request_id, score, label); any problem is a BadRequest naming the field."""
    raw = json_body(body, empty={})
    if not isinstance(raw.get("request_id"), str) or not raw["request_id"]:
        raise BadRequest("request_id: required string", param="request_id")
    score, label = raw.get("score"), raw.get("label")
    if score is None and label is None:
        raise BadRequest("send score (number) or label (string)", param="score")
    # NaN fails both comparisons and infinity the second: only a finite number in [0, 1] passes.
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))
                              or not 0 <= score <= 1):
        raise BadRequest("score: must be a number from 0 to 1", param="score")
    if label is not None and (not isinstance(label, str) or len(label) > MAX_LABEL):
        raise BadRequest(f"label: must be a string of at most {MAX_LABEL} characters", param="label")
    return raw["request_id"][:128], None if score is None else float(score), label


def not_found(request_id: str) -> BadRequest:
    """One answer for a request that never existed and for another tenant's: no existence leak."""
    return BadRequest(f"request '{request_id}' does not exist or you do not have access to it",
                      param="request_id", status=404, code="request_not_found")


class RequestOwners:
    """(tenant, request id) of the last `capacity` requests known to be in the trace log: the ones
    this replica traced, and the ones a lookup found. Bounded, so a long-lived replica stays small;
    an older request is looked up again."""

    def __init__(self, capacity: int = 100_000):
        self.capacity = capacity
        self._known: OrderedDict[tuple[str, str], None] = OrderedDict()

    def add(self, tenant: str, request_id: str) -> None:
        self._known[(tenant, request_id)] = None
        self._known.move_to_end((tenant, request_id))
        while len(self._known) > self.capacity:
            self._known.popitem(last=False)

    def __contains__(self, key: tuple[str, str]) -> bool:
        return key in self._known

    def __len__(self) -> int:
        return len(self._known)


def holds_request(root: str | Path, tenant: str, request_id: str) -> bool:
    """Whether the trace log under `root` has a record of `request_id` served to `tenant`. Newest
    first: the write-ahead log (a just-answered request is there: it is fsynced before the answer
    goes out), the sealed segments, then the Parquet parts (imported ones included), of which only
    the `request_id` and `tenant` columns are read. Compaction moves records in this same order
    (log -> segment -> part), so a record moving during the scan is met again further on."""
    import pyarrow.parquet as pq

    root = Path(root)
    quoted = json.dumps(request_id, ensure_ascii=False)  # as the log writes it, so a line can be skipped unparsed
    for seg in [root / "wal.jsonl"] + sorted(root.glob("wal-*.sealed"), reverse=True):
        if seg.exists() and _segment_holds(seg, quoted, tenant, request_id):
            return True
    for part in sorted((root / "parquet").glob("part-*.parquet"), reverse=True):
        try:
            found = pq.read_table(part, columns=["request_id", "tenant"], filters=[("request_id", "==", request_id)])
        except FileNotFoundError:  # an import's part replaced while we read: its records are elsewhere or gone
            continue
        if tenant in found.column("tenant").to_pylist():
            return True
    return False


def _segment_holds(path: Path, quoted: str, tenant: str, request_id: str) -> bool:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if quoted not in line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:  # a torn last line: never acknowledged
                    continue
                if row.get("request_id") == request_id and row.get("tenant") == tenant:
                    return True
    except FileNotFoundError:  # sealed and compacted meanwhile: the part is read next
        pass
    return False


def log_holds_request(trace_log, tenant: str, request_id: str) -> bool:
    """`holds_request` run on the TraceLog actor, beside its files (run through Ray's
    `__ray_call__`, which calls this with the actor's instance): a gateway replica on another node
    need not see the storage root."""
    return holds_request(trace_log.root, tenant, request_id)
