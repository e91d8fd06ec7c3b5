"""The label stage's files: what the teacher failed on, the train / held-out split as written, the replay
buffer drawn from an endpoint's earlier cycles, and where the last cycle stopped reading the trace log.

`endpoint_dir` is `.loop/cycles/<endpoint>/`; cycle N's label outputs are in `cycle-NNNN/label/`.
"""
from __future__ import annotations

import json
from pathlib import Path

from loop.data.select import replay_rows


def _label_dir(endpoint_dir: Path, number: int) -> Path:
    return endpoint_dir / f"cycle-{number:04d}" / "label"


def previous_cutoff(endpoint_dir: Path, number: int) -> float:
    """The newest trace timestamp cycle `number - 1` read (0 before any): cycle `number` reads after it."""
    prev = _label_dir(endpoint_dir, number - 1) / "result.json"
    return json.loads(prev.read_text())["cutoff"] if number > 1 and prev.exists() else 0.0


def earlier_imports(endpoint_dir: Path, number: int) -> set[str]:
    """Digests of the imported log files the endpoint's earlier cycles learned from (each file once)."""
    out: set[str] = set()
    for prev in range(1, number):
        f = _label_dir(endpoint_dir, prev) / "result.json"
        if f.exists():
            out.update(json.loads(f.read_text()).get("imports", []))
    return out


def escalation_labels(rows: list[dict], prompts: list[str]) -> tuple[list[str], list[dict]]:
    """A prompt the cascade escalated already has the teacher's answer in the trace log: that is its
    label, and the teacher is not paid twice. Returns the prompts still to ask, and label rows (as the
    labelling actor makes them, `cost_usd` 0, `from_escalation`) for the others."""
    answered = {r["prompt"]: r["completion"] for r in rows if r.get("escalated") and r.get("completion")}
    reused = [{"messages": p, "completion": answered[p], "label_error": "", "top_logprobs": "", "prompt_tokens": 0,
               "completion_tokens": 0, "cost_usd": 0.0, "cached": True, "from_escalation": True}
              for p in prompts if p in answered]
    return [p for p in prompts if p not in answered], reused


def write_failures(path: Path, failed: list[dict]) -> None:
    """What the teacher failed to label, and why, for the record."""
    path.write_text("".join(json.dumps({"messages": json.loads(r["messages"]), "error": r["label_error"]}) + "\n"
                            for r in failed))


def write_split(sdir: Path, good: list[dict], heldout: set[str], kept: list[dict] = ()) -> Path:
    """Labelled rows to `train.jsonl`, or to `heldout.jsonl` when their prompt is held out; then the
    `kept` served answers (`{"prompt", "completion"}`, rated good) as training rows without an
    end-of-turn token (`"eos": false`, `"source": "kept"`). Returns the path of `train.jsonl`."""
    path = sdir / "train.jsonl"
    with open(path, "w") as f, open(sdir / "heldout.jsonl", "w") as h:
        for r in good:
            row = {"messages": json.loads(r["messages"]), "completion": r["completion"]}
            if r.get("top_logprobs"):
                row["top_logprobs"] = json.loads(r["top_logprobs"])
            (h if r["messages"] in heldout else f).write(json.dumps(row) + "\n")
        for r in kept:
            f.write(json.dumps({"messages": json.loads(r["prompt"]), "completion": r["completion"], "eos": False,
                                "source": "kept"}) + "\n")
    return path


def write_replay(endpoint_dir: Path, number: int, path: Path, n: int) -> int:
    """Replay buffer: `n` examples drawn (seeded by the cycle) from the endpoint's earlier datasets,
    except prompts this cycle relabelled (their old answers are stale). Returns how many."""
    earlier = []
    for prev in range(1, number):
        f = _label_dir(endpoint_dir, prev) / "train.jsonl"
        if f.exists():
            earlier += [line for line in f.read_text().splitlines() if line.strip()]
    current = [line for line in (path.parent / "train.jsonl").read_text().splitlines() if line.strip()]
    picked = replay_rows(earlier, current, n, seed=number)
    path.write_text("".join(line + "\n" for line in picked))
    return len(picked)


def replay_sources(endpoint_dir: Path, number: int) -> str:
    """The dataset digests of the endpoint's earlier cycles, which the replay buffer drew from."""
    out = []
    for prev in range(1, number):
        f = _label_dir(endpoint_dir, prev) / "result.json"
        if f.exists():
            out.append(f"cycle-{prev}:{json.loads(f.read_text())['dataset_digest']}")
    return ",".join(out)
