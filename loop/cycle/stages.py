"""Stage bookkeeping shared by every cycle: atomic result files, the manifest of an output's digests
that says whether a finished stage can be skipped, and the fault-injection point the resume tests
kill the driver at. Nothing here knows what a stage does."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from loop.models.digest import dir_digest


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


def output_digest(path: Path) -> str | None:
    if path.is_dir():
        return dir_digest(path)
    if path.is_file():
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    return None


def manifest(sdir: Path) -> dict:
    """Digests of a stage's outputs: its directories (adapter, merged model, draft) and datasets
    (.jsonl). Reports beside them are descriptions, not inputs of later stages, and are left out."""
    return {p.name: output_digest(p) for p in sorted(sdir.iterdir())
            if (p.suffix == ".jsonl" and p.name != "label_failures.jsonl")
            or (p.is_dir() and any(f.is_file() for f in p.rglob("*")))}


FAULT_ENV = "LOOP_FAULT_KILL"


def fault_point(endpoint: str, stage: str, when: str) -> None:
    """Fault injection for the resume tests: with LOOP_FAULT_KILL=[<endpoint>:]<stage>[@before|@after]
    the process dies like a kill -9 at that point of the stage. `after` (the default) is after the
    stage did its work and before it is recorded as done: the worst moment, every side effect there
    and no result saying so. `before` is after its MLflow run started, before any work."""
    want = os.environ.get(FAULT_ENV, "")
    target, _, at = want.partition("@")
    if want and target in (stage, f"{endpoint}:{stage}") and (at or "after") == when:
        print(f"[fault] killing the driver {when} stage {stage} of {endpoint} ({FAULT_ENV}={want})", flush=True)
        os._exit(137)
