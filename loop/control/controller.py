"""The promotion controller: watches each endpoint's live challenger and promotes or rolls it back.

One `step(endpoint)` reads the trace log and the feedback since the challenger went live (evaluation
traffic excluded; feedback joined to a request by (tenant, request id), so no tenant grades another's
requests), has the teacher grade the arms' unrated answers when `data.judge` is set (each grade a
feedback row, loop/control/judged.py), asks the teacher about a shadow sample of answers when
`promotion.shadow_fraction` is set,
applies `loop.control.decision.decide`, records the evidence in MLflow (a run per challenger,
`<endpoint>-promotion-<n>`, one metric step per decision; the verdict and its reasons as tags on
the version), and carries a promote or rollback out through the same path as the admin API
(`RolloutController.act`, MLflow aliases first, then every gateway replica).
"""
from __future__ import annotations

import json
import random
import time
from datetime import datetime

from loop.control.decision import Decision, decide, variant_stats
from loop.traces.log import EVAL_USER, tool_traffic


def _epoch_s(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp() if iso else 0.0


def feedback_scores(feedback: list[dict], since: float) -> dict[tuple[str, str], float]:
    """Score by (tenant, request id) of the feedback given since `since` (a later score of the same
    request wins). A row without a tenant (written before feedback was tenant-scoped) counts for none."""
    return {(f["tenant"], f["request_id"]): float(f["score"]) for f in feedback
            if f.get("tenant") and f.get("score") is not None and f.get("ts", 0) >= since}


class PromotionController:
    def __init__(self, services):
        self.services, self.cfg = services, services.cfg
        self.lineage = services.lineage
        self.traces = self.cfg.storage.path("traces")
        self._judge = None  # data.judge's grader, made on its first use

    def step(self, endpoint: str, act: bool = True) -> Decision | None:
        """Decide once for `endpoint`'s challenger (None when it has none); with `act`, carry it out."""
        from loop.traces.log import read_feedback, read_traces

        champion = self.lineage.version_info(endpoint, "champion")
        challenger = self.lineage.version_info(endpoint, "challenger")
        if challenger is None:
            return None
        since = _epoch_s(challenger["deployed_at"])
        rows = [r for r in read_traces(self.traces) if r["endpoint"] == endpoint and r["ts"] >= since
                and not r["user"].startswith(EVAL_USER)]
        feedback = read_feedback(self.traces)
        judged = self._grade_unrated(rows, feedback)
        scores = feedback_scores(feedback, since)
        p = self.cfg.promotion
        agreement = self._shadow(endpoint, rows, scores) if p.shadow_fraction > 0 else {}
        stats = [variant_stats(v["version"], [r for r in rows if r["model_version"] == v["version"]], scores,
                               agreement, p.positive_score) for v in (champion, challenger)]
        decision = decide(stats[0], stats[1], p)
        self._record(endpoint, challenger, decision, judged)
        if act and decision.action in ("promote", "rollback"):
            from loop.cluster import admin

            admin(self.services, decision.action, endpoint, by="controller")
        return decision

    def _grade_unrated(self, rows: list[dict], feedback: list[dict]):
        """`data.judge`: the teacher grades the answered requests of `rows` that no user rated; the
        grades are appended to the feedback log and to `feedback` (outcomes for this step and every
        later one). Returns what it graded and paid (None without `data.judge`)."""
        jcfg = self.cfg.data.judge
        if jcfg is None:
            return None
        import ray

        from loop.control.judged import judge_unrated
        from loop.teacher.judge import outcome_judge

        if self._judge is None:
            self._judge = outcome_judge(self.cfg, self.services.teacher_url)

        def append(grades: list[dict]) -> None:
            ray.get(self.services.trace_log.append_feedback.remote(grades))
            feedback.extend(grades)

        return judge_unrated(jcfg, rows, feedback, self._judge, append)

    def _shadow(self, endpoint: str, rows: list[dict], scores: dict) -> dict[tuple[str, str], float]:
        """Token F1 of the student's answer against the teacher's by (tenant, request id), for a seeded
        `shadow_fraction` sample of the answered requests that have no feedback; cached on disk, so each
        request is asked about once (a cache line from before it named the tenant is asked again)."""
        from loop.teacher.client import ask, make_client
        from loop.validate.gate import token_f1

        path = self.cfg.storage.path("shadow", f"{endpoint}.jsonl")
        path.parent.mkdir(parents=True, exist_ok=True)
        done = {}
        if path.exists():
            done = {(d["tenant"], d["request_id"]): d["agreement"]
                    for d in map(json.loads, path.read_text().splitlines()) if d and d.get("tenant")}
        # A tool-using conversation is not asked of the teacher (it would answer without the tools).
        todo = [r for r in rows if r["status"] == 200 and (r["tenant"], r["request_id"]) not in scores
                and (r["tenant"], r["request_id"]) not in done and not tool_traffic(r)
                and random.Random(r["request_id"]).random() < self.cfg.promotion.shadow_fraction]
        if todo and self.cfg.teacher.kind != "local":
            t = self.cfg.teacher
            client = make_client(t, self.services.teacher_url)
            with path.open("a") as f:
                for r in todo:
                    answer = ask(client, t.model, json.loads(r["prompt"]), t.max_tokens)
                    key = (r["tenant"], r["request_id"])
                    done[key] = token_f1(r["student_completion"] or r["completion"], answer)
                    f.write(json.dumps({"tenant": key[0], "request_id": key[1], "agreement": done[key]}) + "\n")
        return done

    def _record(self, endpoint: str, challenger: dict, d: Decision, judged=None) -> None:
        """The decision and its evidence in MLflow: metrics on the challenger's promotion run (with the
        judge's grades and cost of this step), and the verdict as tags on the version once there is one."""
        number = challenger["number"]
        mv = self.lineage.client.get_model_version(f"student-{endpoint}", str(number))
        # One run per time the version is challenger: `promotion_open_run_id` while it is undecided.
        run_id = mv.tags.get("promotion_open_run_id")
        step = int(mv.tags.get("promotion_steps", "0")) + 1 if run_id else 1
        if not run_id:
            run_id = self.lineage.start_run(f"{endpoint}-promotion-{number}", tags={
                "loop.endpoint": endpoint, "loop.stage": "promotion", "loop.challenger": challenger["version"],
                **({"mlflow.parentRunId": mv.tags["cycle_run_id"]} if mv.tags.get("cycle_run_id") else {})})
            self.lineage.tag_version(endpoint, number, {"promotion_open_run_id": run_id})
        metrics = {"p_better": d.p_better if d.p_better == d.p_better else None}
        for side in ("champion", "challenger"):
            s = getattr(d, side)
            metrics.update({f"{side}.{k}": s[k] for k in ("requests", "outcomes", "errors", "escalation_rate",
                                                          "latency_p95_ms", "error_rate")})
            if s["outcomes"]:
                metrics[f"{side}.success_rate"] = s["success_rate"]
        if judged is not None:
            metrics.update(judged.metrics())
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.lineage.client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()
                                                       if v is not None])
        self.lineage.tag_version(endpoint, number, {"promotion_steps": step})
        if d.action != "continue":
            self.lineage.log_dict(run_id, d.to_dict(), f"decision-{step:04d}.json")
            self.lineage.log(run_id, tags={"decision": d.action, "reasons": " | ".join(d.reasons)[:5000]})
            self.lineage.tag_version(endpoint, number, {"promotion_decision": d.action, "promotion_run_id": run_id,
                                                        "promotion_reasons": " | ".join(d.reasons)[:5000]})
            self.lineage.client.delete_model_version_tag(f"student-{endpoint}", str(number), "promotion_open_run_id")
            self.lineage.end_run(run_id)
