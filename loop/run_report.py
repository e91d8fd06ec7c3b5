"""The run report: does the student keep pace with the frontier, and what does it cost?

Built from what the cycles left on disk (`.loop/cycles/<endpoint>/cycle-NNNN/`) and the trace log,
so it can be rebuilt at any time (`loopctl report CONFIG`). Written to `.loop/reports/<run>/`:
`report.json` (the numbers), `report.md` (the same for people) and `accuracy.png` (the plot).

Per cycle (one world epoch): on the held-out phrasings of the current facts, the static snapshot
(version 1, never updated), the champion before and after the cycle, and the teacher; the champion on
the regression questions against the static snapshot; the draft's acceptance, stale and co-trained;
stage times. Over the run: the share of requests the student answered (the rest the cascade escalated
to the teacher), teacher calls for escalation and for labels, and the cost per request against
sending every request to the teacher, at the config's prices.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

from loop.config import LoopConfig
from loop.cycle.results import (CanaryResult, DraftResult, EvaluateResult, LabelResult, TrafficResult,
                                read_result)

TARGETS = {"champion_over_teacher": 0.9, "regression_drop_pts": 2.0, "student_share": 0.8, "cost_ratio_vs_teacher": 0.2}


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else v


def cycle_entry(cfg: LoopConfig, endpoint: str, number: int) -> dict:
    """One finished cycle's line of the report."""
    d = cfg.storage.path("cycles", endpoint, f"cycle-{number:04d}")
    rep = _read(d / "report.json")
    if not rep:
        raise FileNotFoundError(f"{d}: cycle {number} of {endpoint} has no report.json (not finished)")
    label, draft, traffic, canary, after = (
        read_result(d, stage, kind) for stage, kind in (("label", LabelResult), ("draft", DraftResult),
                                                        ("traffic", TrafficResult), ("canary", CanaryResult),
                                                        ("evaluate", EvaluateResult)))
    teacher, champion = rep["teacher_acc"], rep["student_acc_after"]
    base_reg, reg = _num(rep.get("base_regression_acc")), _num(rep.get("regression_acc"))
    return {
        "endpoint": endpoint, "cycle": number, "epoch": rep["epoch"],
        "static_acc": _num(rep.get("static_acc")), "champion_acc_before": rep["student_acc_before"],
        "champion_acc": champion, "teacher_acc": teacher,
        "champion_over_teacher": champion / teacher if teacher else None,
        "regression_acc": reg, "base_regression_acc": base_reg,
        "regression_drop_pts": 100 * (base_reg - reg) if reg is not None and base_reg is not None else None,
        "draft_acceptance_stale": draft.acceptance_stale if draft else None,
        "draft_acceptance_cotrained": draft.acceptance_cotrained if draft else None, "draft_k": draft and draft.k,
        "new_version": rep.get("new_version"), "validation_passed": rep.get("validation_passed"),
        "promotion": rep.get("promotion"), "served_by": rep.get("served_after"),
        "requests": (traffic.requests if traffic else 0) + (canary.requests if canary else 0),
        "labels": label.labelled if label else 0,
        "label_calls": label.labelled - label.teacher_cached if label else 0,
        "labels_from_escalations": label.from_escalation if label else 0,
        "label_cache_hits": label.teacher_cached - label.from_escalation if label else 0,
        "kept": label.kept if label else 0, "label_cost_usd": label.teacher_cost_usd if label else 0.0,
        "label_completion_tokens": label.teacher_completion_tokens if label else None,
        "suites": rep.get("suites", {}), "teacher_agreement": _num(rep.get("teacher_agreement")),
        "stage_seconds": rep.get("stage_seconds", {}), "stage_clock": rep.get("stage_clock", {}),
        "cycle_seconds": sum(rep.get("stage_seconds", {}).values()),
        "window": [traffic.record.started_at if traffic and traffic.record else None,
                   after.record.ended_at if after and after.record else None],
    }


def cost(cfg: LoopConfig, cycles: list[dict]) -> dict:
    """Requests in the cycles' windows (simulated or real users; never the evaluation), what the
    student and the teacher were paid for them, and what the teacher alone would have cost."""
    from loop.traces.log import EVAL_USER
    from loop.traces.log import read_traces

    endpoints = {c["endpoint"] for c in cycles}
    windows = [c["window"] for c in cycles if None not in c["window"]]
    rows = [r for r in read_traces(cfg.storage.path("traces"))
            if r["endpoint"] in endpoints and r["status"] == 200 and not r["user"].startswith(EVAL_USER)
            and any(a <= r["ts"] <= b for a, b in windows)]
    n = len(rows)
    escalated = sum(bool(r["escalated"]) for r in rows)
    prompt = sum(r["prompt_tokens"] for r in rows)
    completion = sum(r["completion_tokens"] for r in rows)
    calls = sum(c["label_calls"] for c in cycles)
    label_tokens = [c["label_completion_tokens"] for c in cycles if c["label_completion_tokens"]]
    # The teacher's answers are as long as its labels were; without labels, as the student's.
    answer_tokens = sum(label_tokens) / calls if label_tokens and calls else completion / max(1, n)
    t, c = cfg.teacher, cfg.cost
    student_usd = (prompt * c.student_usd_per_million_prompt_tokens
                   + completion * c.student_usd_per_million_completion_tokens) / 1e6
    per_teacher_call = lambda p: (p * t.usd_per_million_prompt_tokens  # noqa: E731
                                  + answer_tokens * t.usd_per_million_completion_tokens) / 1e6
    escalation_usd = sum(per_teacher_call(r["prompt_tokens"]) for r in rows if r["escalated"])
    label_usd = sum(c_["label_cost_usd"] for c_ in cycles)
    teacher_only = sum(per_teacher_call(r["prompt_tokens"]) for r in rows)
    total = student_usd + escalation_usd + label_usd
    return {
        "requests": n, "student_served": n - escalated, "escalated": escalated,
        "student_share": (n - escalated) / n if n else None,
        "teacher_calls": {"escalation": escalated, "labels": calls},
        "labels": {"used": sum(c_["labels"] for c_ in cycles), "from_teacher_calls": calls,
                   "from_escalations": sum(c_["labels_from_escalations"] for c_ in cycles),
                   "from_cache": sum(c_["label_cache_hits"] for c_ in cycles)},
        "tokens": {"prompt": prompt, "completion": completion, "teacher_answer_mean": answer_tokens},
        "usd": {"student": student_usd, "escalation": escalation_usd, "labels": label_usd, "total": total,
                "teacher_only": teacher_only},
        "cost_per_request_usd": total / n if n else None,
        "teacher_cost_per_request_usd": teacher_only / n if n else None,
        "cost_ratio_vs_teacher": total / teacher_only if teacher_only else None,
        "prices_usd_per_million_tokens": {
            "student": {"prompt": c.student_usd_per_million_prompt_tokens,
                        "completion": c.student_usd_per_million_completion_tokens},
            "teacher": {"prompt": t.usd_per_million_prompt_tokens,
                        "completion": t.usd_per_million_completion_tokens}},
    }


def targets(cycles: list[dict], money: dict) -> dict:
    """Each target of the demo, its measured value and whether it was met."""
    def check(value, ok):
        return {"value": value, "met": bool(ok) if value is not None else None}

    out = {}
    ratios = [c["champion_over_teacher"] for c in cycles if c["champion_over_teacher"] is not None]
    out["champion_over_teacher_min"] = check(min(ratios) if ratios else None,
                                             ratios and min(ratios) >= TARGETS["champion_over_teacher"])
    drops = [c["regression_drop_pts"] for c in cycles if c["regression_drop_pts"] is not None]
    out["regression_drop_pts_max"] = check(max(drops) if drops else None,
                                           drops and max(drops) <= TARGETS["regression_drop_pts"])
    falling = []
    for e in {c["endpoint"] for c in cycles}:
        line = [c["static_acc"] for c in cycles if c["endpoint"] == e and c["static_acc"] is not None]
        falling.append(len(line) > 1 and all(b < a for a, b in zip(line, line[1:])))
    out["static_falls_every_epoch"] = check(all(falling) if falling else None, all(falling))
    above = [c["champion_acc"] > c["static_acc"] for c in cycles if c["static_acc"] is not None]
    out["champion_above_static"] = check(all(above) if above else None, all(above))
    out["student_share"] = check(money["student_share"], (money["student_share"] or 0) >= TARGETS["student_share"])
    ratio = money["cost_ratio_vs_teacher"]
    out["cost_ratio_vs_teacher"] = check(ratio, ratio is not None and ratio <= TARGETS["cost_ratio_vs_teacher"])
    return out


def build(cfg: LoopConfig, cycles: list[tuple[str, int]], run: str, wall_seconds: float | None = None,
          gateway_url: str | None = None) -> dict:
    from loop.models.fetch import ModelMissing, read_manifest

    entries = [cycle_entry(cfg, e, n) for e, n in cycles]
    money = cost(cfg, entries)
    try:
        cycle0 = read_manifest(cfg.model_path(cfg.student)).get("bootstrap")
    except ModelMissing:
        cycle0 = None
    return {
        "run": run, "config": cfg.name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "student": cfg.student.name, "teacher": cfg.teacher.model if cfg.teacher.kind != "local" else cfg.teacher.path,
        "wall_seconds": wall_seconds, "cycles": entries, "cycle0_student": cycle0,
        "student_share": money["student_share"], "cost_ratio_vs_teacher": money["cost_ratio_vs_teacher"],
        "cost": money, "targets": targets(entries, money) if cfg.traffic.simulate else {},
        "target_thresholds": TARGETS if cfg.traffic.simulate else {},
        "where_next": {
            "endpoint": gateway_url or f"http://{cfg.serving.host}:{cfg.serving.port}/v1",
            "serve": "loopctl serve CONFIG (or make serve), then any OpenAI client",
            "mlflow_ui": f"mlflow ui --backend-store-uri {cfg.storage.tracking_uri}",
            "ray_dashboard": "http://127.0.0.1:8265 (while the loop or loopctl serve runs)",
            "lineage": "loopctl lineage MODEL"},
    }


def write(cfg: LoopConfig, report: dict) -> Path:
    """report.json, accuracy.png and report.md under .loop/reports/<run>/; returns the directory.
    Written to a temporary directory first, so a crash leaves no half report."""
    import shutil

    out = cfg.storage.path("reports", report["run"])
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "report.json").write_text(json.dumps(report, indent=2))
    plot(report, tmp / "accuracy.png")
    (tmp / "report.md").write_text(markdown(report))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def plot(report: dict, path: Path) -> None:
    """Accuracy on the current facts per epoch (static, champion, teacher), and the regression set."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    endpoints = sorted({c["endpoint"] for c in report["cycles"]})
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    c0 = report.get("cycle0_student")
    if c0:
        axes[1].plot([c0["epoch"]], [c0["general_acc_before"]], marker="*", markersize=12, color="tab:purple",
                     linestyle="none", label="the base model, before it became the cycle-0 student")

    def line(cs: list[dict], key: str, start: float | None = None) -> list[float]:
        """A line's values per epoch; with a cycle-0 student, starting from it at its epoch."""
        values = [c[key] if c[key] is not None else float("nan") for c in cs]
        return ([start] if c0 and start is not None else []) + values

    for e in endpoints:
        cs = [c for c in report["cycles"] if c["endpoint"] == e]
        x = ([c0["epoch"]] if c0 else []) + [c["epoch"] for c in cs]
        known = c0["heldout_acc_after"] if c0 else None
        general = c0["general_acc_after"] if c0 else None
        tag = f" ({e})" if len(endpoints) > 1 else ""
        ax, ax2 = axes
        ax.plot(x, line(cs, "teacher_acc", 1.0 if c0 else None), "k--", marker="s", label=f"teacher (frontier){tag}")
        ax.plot(x, line(cs, "champion_acc", known), "-", marker="o", color="tab:green",
                label=f"continual student (champion after each cycle){tag}")
        ax.plot(x[len(x) - len(cs):], line(cs, "champion_acc_before"), ":", marker="x", color="tab:olive",
                label=f"champion before the cycle (the world moved){tag}")
        ax.plot(x, line(cs, "static_acc", known), "-", marker="v", color="tab:red",
                label=f"static snapshot (the cycle-0 student, never updated){tag}")
        ax2.plot(x, line(cs, "regression_acc", general), "-", marker="o", color="tab:green", label=f"champion{tag}")
        ax2.plot(x, line(cs, "base_regression_acc", general), "-", marker="v", color="tab:red",
                 label=f"static snapshot{tag}")
    axes[0].set_title("Held-out questions on the current facts")
    axes[1].set_title("General questions (regression set)")
    for ax in axes:
        ax.set_xlabel("world epoch (one cycle each)")
        ax.set_ylabel("accuracy")
        ax.set_ylim(-0.03, 1.05)
        ax.set_xticks(sorted({c["epoch"] for c in report["cycles"]} | ({c0["epoch"]} if c0 else set())))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    share, ratio = report["student_share"], report["cost_ratio_vs_teacher"]
    fig.suptitle(f"{report['student']} vs {report['teacher']}: student served "
                 f"{_pct(share)} of requests at {_ratio(ratio)} of the teacher's cost", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.0f}%"


def _ratio(v) -> str:
    return "n/a" if v is None else f"{v:.3f}x"


def _f(v, digits: int = 2) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def markdown(report: dict) -> str:
    money, t = report["cost"], report["targets"]
    lines = [f"# Continual-learning report: {report['run']}", "",
             f"Config `{report['config']}`; student {report['student']}; teacher {report['teacher']}"
             + (f"; {report['wall_seconds'] / 60:.1f} min" if report.get("wall_seconds") else "") + ".", "",
             "![accuracy per epoch](accuracy.png)", ""]
    c0 = report.get("cycle0_student")
    if c0:
        lines += [f"The cycle-0 student (the static snapshot, version 1) was taught the world at epoch {c0['epoch']}: "
                  f"{c0['heldout_acc_after']:.2f} of its held-out questions (the base {c0['heldout_acc_before']:.2f}), "
                  f"{c0['general_acc_after']:.2f} of the general questions (the base {c0['general_acc_before']:.2f}).", ""]
    lines += [
             "## Accuracy per epoch (held-out phrasings of the current facts)", "",
             "| endpoint | cycle | epoch | static snapshot | champion before | champion after | teacher | after / teacher "
             "| general: champion | general: static | draft acceptance stale -> co-trained | promotion | cycle s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in report["cycles"]:
        lines.append(
            f"| {c['endpoint']} | {c['cycle']} | {c['epoch']} | {_f(c['static_acc'])} | {_f(c['champion_acc_before'])} "
            f"| {_f(c['champion_acc'])} | {_f(c['teacher_acc'])} | {_f(c['champion_over_teacher'])} "
            f"| {_f(c['regression_acc'])} | {_f(c['base_regression_acc'])} "
            f"| {_f(c['draft_acceptance_stale'])} -> {_f(c['draft_acceptance_cotrained'])} (k={c['draft_k'] or 'n/a'}) "
            f"| {c['promotion'] or 'n/a'} {c['new_version'] or ''} | {c['cycle_seconds']:.0f} |")
    suites = [(c, name, v) for c in report["cycles"] for name, v in c.get("suites", {}).items()]
    if suites:
        lines += ["", "## The gate's suites per cycle (champion -> candidate; regression against the base)", "",
                  "| endpoint | cycle | suite | kind | items | champion | candidate | base | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['endpoint']} | {c['cycle']} | {name} | {v['kind']} | {v['num_items']} | {_f(v['champion'])} "
                  f"| {_f(v['candidate'])} | {_f(v.get('base'))} | {'pass' if v['passed'] else 'FAIL'} |"
                  for c, name, v in suites]
    p = money["prices_usd_per_million_tokens"]
    lines += ["", "## Cost", "",
              f"Prices (USD per million tokens): student {p['student']['prompt']} prompt / "
              f"{p['student']['completion']} completion; teacher {p['teacher']['prompt']} / {p['teacher']['completion']}.",
              "", "| | value |", "|---|---|",
              f"| requests | {money['requests']} |",
              f"| answered by the student | {money['student_served']} ({_pct(money['student_share'])}) |",
              f"| escalated to the teacher (cascade) | {money['escalated']} |",
              f"| teacher calls for labels | {money['teacher_calls']['labels']} (labels used: "
              f"{money['labels']['used']}, of which {money['labels']['from_escalations']} were the escalations' "
              f"answers and {money['labels']['from_cache']} came from the cache) |",
              f"| cost per request | ${_f(money['cost_per_request_usd'], 8)} |",
              f"| the teacher for every request | ${_f(money['teacher_cost_per_request_usd'], 8)} |",
              f"| **ratio** | **{_f(money['cost_ratio_vs_teacher'], 3)}** |",
              "", "The teacher-only cost prices every request's prompt at the teacher's rate and its answer at the "
              "mean length of the teacher's labels; token counts are the student tokenizer's (the gateway's, "
              "and the reference teacher's usage).", "", "## Targets", "", "| target | value | met |", "|---|---|---|"]
    for name, v in t.items():
        lines.append(f"| {name} | {_f(v['value'], 3) if isinstance(v['value'], float) else v['value']} "
                     f"| {'yes' if v['met'] else 'no' if v['met'] is False else 'n/a'} |")
    w = report["where_next"]
    lines += ["", "## Where to look next", "", f"- endpoint: {w['endpoint']} ({w['serve']})",
              f"- lineage: `{w['mlflow_ui']}`, or `{w['lineage']}`", f"- Ray dashboard: {w['ray_dashboard']}", ""]
    return "\n".join(lines)
