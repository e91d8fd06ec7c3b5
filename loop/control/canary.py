"""What a cycle's canary stage reads back: a verdict reached before a restart, when the new version
first served, and the stage clock from checkpoint written to canary traffic."""
from __future__ import annotations

from pathlib import Path


def settled_verdict(lineage, endpoint: str, reg: dict, traces: Path) -> dict | None:
    """The verdict on version `reg` when it is no longer the challenger (promoted or rolled back, by
    the controller or an operator, possibly before a crash), else None."""
    live = lineage.version_info(endpoint, "challenger")
    if live and live["number"] == reg["number"]:
        return None
    tags = lineage.client.get_model_version(f"student-{endpoint}", str(reg["number"])).tags
    decision = tags.get("promotion_decision") or ("promote" if tags.get("promoted_at") else "rollback")
    return {"decision": decision, "reasons": [tags.get("promotion_reasons", "decided before this run")],
            "p_better": float("nan"), "rounds": 0, "requests": 0, "champion": {}, "challenger": {},
            "first_canary_request_ts": first_served(traces, endpoint, reg["version"])}


def first_served(traces: Path, endpoint: str, version: str) -> float | None:
    """When `version` of `endpoint` answered its first request (trace timestamp), or None."""
    from loop.traces.log import read_traces

    ts = [r["ts"] for r in read_traces(traces) if r["endpoint"] == endpoint and r["model_version"] == version]
    return min(ts) if ts else None


def stage_clock(stage_seconds: dict, written: float | None, first: float | None) -> dict | None:
    """From the checkpoint on disk (`written`: the train stage's end) to the first request the new
    version served as challenger (`first`), and each stage's share of it (`other_share`: what no stage
    accounts for)."""
    if not first or not written:
        return None
    total = first - written
    clock = {"checkpoint_to_canary_s": total}
    for name in ("merge", "draft", "validate", "register", "deploy"):
        if name in stage_seconds:
            clock[f"{name}_share"] = stage_seconds[name] / total
    clock["other_share"] = 1 - sum(v for k, v in clock.items() if k.endswith("_share"))
    return clock
