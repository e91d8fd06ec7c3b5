"""Content digests of model and adapter directories: the identity every stage reads inputs by."""
from __future__ import annotations

import hashlib
from pathlib import Path

# Files that define a model's behaviour (or a dataset's rows); logs and manifests beside them do not count.
_SKIP = {"loop-model.json", "README.md", "training_args.bin", "label_failures.jsonl"}


def dir_digest(path: str | Path) -> str:
    """sha256 over (relative name, bytes) of every file under `path`, in sorted order."""
    root = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name not in _SKIP)
    if not files:
        raise FileNotFoundError(f"{root}: no files to digest")
    for p in files:
        h.update(str(p.relative_to(root)).encode() + b"\0")
        with p.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


def short(digest: str) -> str:
    return digest.split(":")[-1][:12]
