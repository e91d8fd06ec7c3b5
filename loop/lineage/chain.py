"""`loopctl lineage ENDPOINT [VERSION]`: one version's chain, from the cycle that made it to the
requests it served, read from MLflow (the source of truth) and the trace log.

cycle run -> dataset digest (+ replay sources) -> adapter -> merged model -> draft -> validation
verdict -> deployments (when, which role and weight) -> promotion decision -> requests served.
"""
from __future__ import annotations

import json

from loop.config import LoopConfig
from loop.lineage.registry import registered_name, version_label

HELDOUT_SUITE = "heldout-teacher"
"""The skill suite the gate makes of a cycle's held-out teacher labels (loop/suites.py)."""


def chain(cfg: LoopConfig, endpoint: str, version: int | None = None) -> dict:
    """The chain of `version` (default: the champion) of `endpoint`, as a dict."""
    from mlflow.exceptions import MlflowException

    from loop.lineage.registry import Lineage
    from loop.traces.log import read_traces

    endpoint = endpoint.removeprefix("model-")
    if endpoint not in {e.id for _, e in cfg.endpoints()}:
        raise KeyError(f"model-{endpoint} is not an endpoint of {cfg.name}: one of "
                       f"{', '.join('model-' + e.id for _, e in cfg.endpoints())}")
    lineage = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
    name = registered_name(endpoint)
    try:
        aliases = lineage.client.get_registered_model(name).aliases
        if version is None:
            version = int(aliases["champion"])
        mv = lineage.client.get_model_version(name, str(version))
    except (MlflowException, KeyError):
        raise KeyError(f"{name} has no version {version if version is not None else '(champion)'}; "
                       "`loopctl lineage` lists what a cycle registered") from None
    t = mv.tags
    label = version_label(endpoint, version)
    roles = sorted(a for a, v in aliases.items() if int(v) == int(version))
    out: dict = {"version": label, "live_as": roles, "kind": t.get("loop.kind", "adapter"),
                 "parent_version": t.get("parent_version", "")}
    if t.get("cycle_run_id"):
        run = lineage.client.get_run(t["cycle_run_id"])
        out["cycle_run"] = {"run_id": run.info.run_id, "name": run.info.run_name, "status": run.info.status,
                            "cycle": run.data.tags.get("loop.cycle")}
    out["dataset"] = {"digest": t.get("dataset_digest", ""), "replay_from": t.get("replay_sources", ""),
                      "traces": t.get("trace_sources", ""),
                      "imported_logs": [d for d in t.get("imported_logs", "").split(",") if d]}
    out["adapter"] = {"digest": t.get("adapter_digest", ""), "training_run_id": t.get("training_run_id", ""),
                      "artifact": mv.source}
    out["merged"] = {"digest": t.get("merged_digest", ""), "path": t.get("merged_path", "")}
    out["draft"] = {"digest": t.get("draft_digest", ""), "path": t.get("draft_path", "")}
    report = _validation_report(cfg, endpoint, out.get("cycle_run", {}).get("cycle"))
    out["validation"] = {"verdict": t.get("validation_verdict", ""), "candidate_acc": t.get("candidate_acc", ""),
                         "champion_acc": t.get("champion_acc", ""), "measure": validation_measure(report),
                         **{k: v if (v := (report or {}).get(k)) == v else None
                            for k in ("teacher_agreement", "champion_teacher_agreement")}}
    out["deployments"] = [{"event": k.removesuffix("_at"), "at": t[k], "by": t.get(k.replace("_at", "_by"), "")}
                          for k in ("deployed_at", "promoted_at", "rolled_back_at") if t.get(k)]
    if t.get("deployed_weight"):
        out["deployments"][0]["challenger_weight"] = float(t["deployed_weight"])
    out["promotion"] = {"decision": t.get("promotion_decision", ""), "reasons": t.get("promotion_reasons", ""),
                        "run_id": t.get("promotion_run_id", "")}
    rows = [r for r in read_traces(cfg.storage.path("traces")) if r["model_version"] == label]
    out["requests_served"] = {"total": len(rows), "ok": sum(r["status"] == 200 for r in rows),
                              "as_challenger": sum(r["variant"] == "challenger" for r in rows),
                              "first": min((r["ts"] for r in rows), default=None),
                              "last": max((r["ts"] for r in rows), default=None)}
    out["mlflow_ui"] = f"mlflow ui --backend-store-uri {cfg.storage.tracking_uri}  (model {name}, version {version})"
    return out


def _validation_report(cfg: LoopConfig, endpoint: str, cycle: str | None) -> dict | None:
    """The ValidationReport the cycle's validate stage left on disk (None when it is not there)."""
    if cycle is None:
        return None
    path = cfg.storage.path("cycles", endpoint, f"cycle-{int(cycle):04d}", "validate", "result.json")
    return json.loads(path.read_text()) if path.exists() else None


def validation_measure(report: dict | None) -> str:
    """What the gate's headline score (`candidate_acc`) measured, in words. A real-traffic cycle has no
    facts to check: its score is the agreement with the teacher's held-out labels, not an accuracy."""
    if not report:
        return "gate score"
    suites = report.get("suites") or {}
    skill = next((name for name, s in suites.items() if s.get("kind") == "skill"), None)
    # A report of the gate before suites: the real-traffic score was the teacher agreement itself.
    agreement = skill == HELDOUT_SUITE or (skill is None and bool(report.get("num_agreement"))
                                           and report.get("num_questions") == report["num_agreement"]
                                           and report.get("candidate_acc") == report.get("teacher_agreement"))
    if agreement:
        n = suites[skill]["num_items"] if skill else report["num_agreement"]
        return f"teacher agreement (mean token F1 with the teacher's labels on {n} held-out prompts)"
    if skill:
        return f"suite {skill} score"
    return "held-out accuracy"


def _num(v) -> str:
    try:
        return f"{float(v):.3f}"
    except (TypeError, ValueError):
        return str(v)


def render(c: dict) -> str:
    """The chain as the lines `loopctl lineage` prints."""
    lines = [f"{c['version']}  live as: {', '.join(c['live_as']) or 'not live'}  (parent {c['parent_version'] or '-'})"]
    if "cycle_run" in c:
        r = c["cycle_run"]
        lines.append(f"  cycle run     {r['name']} ({r['run_id']}, {r['status']})")
    if c["kind"] == "base":
        lines.append("  base model    (version 1: no cycle made it)")
    else:
        d = c["dataset"]
        lines += [f"  dataset       {d['digest']}" + (f"  + replay of {d['replay_from']}" if d["replay_from"] else "")
                  + (f"\n  traces        {d['traces']}" if d.get("traces") else "")
                  + "".join(f"\n  imported log  {x}" for x in d.get("imported_logs", [])),
                  f"  adapter       {c['adapter']['digest']}  (training run {c['adapter']['training_run_id']})",
                  f"  merged model  {c['merged']['digest']}  {c['merged']['path']}",
                  f"  draft         {c['draft']['digest']}  {c['draft']['path']}",
                  _validation_line(c["validation"])]
    for d in c["deployments"]:
        weight = f", challenger weight {d['challenger_weight']}" if "challenger_weight" in d else ""
        lines.append(f"  {d['event']:<13} {d['at']}" + (f" by {d['by']}" if d["by"] else "") + weight)
    if c["promotion"]["decision"]:
        lines.append(f"  promotion     {c['promotion']['decision']}: {c['promotion']['reasons']}")
    s = c["requests_served"]
    lines.append(f"  served        {s['total']} requests ({s['ok']} ok, {s['as_challenger']} as challenger)")
    lines.append(f"  MLflow UI     {c['mlflow_ui']}")
    return "\n".join(lines)


def _validation_line(v: dict) -> str:
    measure = v.get("measure", "gate score")
    line = (f"  validation    {v['verdict']} ({measure} {_num(v['candidate_acc'])} "
            f"vs champion {_num(v['champion_acc'])}")
    agreement = v.get("teacher_agreement")
    if not measure.startswith("teacher agreement") and agreement is not None:
        line += f"; teacher agreement {_num(agreement)} vs champion {_num(v.get('champion_teacher_agreement'))}"
    return line + ")"
