"""Outcomes where feedback is thin (`data.judge`): the teacher grades answered requests that no user
rated, and each grade becomes a feedback row marked `source: judge`.

Written through the trace log like a user's feedback, the grades reach everything that reads
outcomes: selection (a low grade marks the prompt for relabelling, loop/data/select.py) and the
promotion controller (an outcome per graded request, loop/control/decision.py). A request is graded
once (its (tenant, request id) then has feedback); for the controller a user's own score, given
later, replaces the grade (the later feedback of a request wins). Calls are capped per call of `judge_unrated`
(`max_requests`, `budget_usd`); the grades, their tokens and cost are counted for MLflow.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass

from loop.config import OutcomeJudgeConfig


@dataclass
class Judged:
    graded: int = 0
    candidates: int = 0
    """Answered requests without feedback that the sample picked."""
    failed: int = 0
    cost_usd: float = 0.0
    tokens: int = 0
    stopped: str = ""
    """Why grading stopped early: `budget` or `max_requests` ("" when every candidate was graded)."""

    def metrics(self, prefix: str = "judge") -> dict:
        return {f"{prefix}.{k}": v for k, v in asdict(self).items() if k != "stopped"}


def unrated(rows: list[dict], feedback: list[dict], fraction: float) -> list[dict]:
    """The answered requests in `rows` (status 200, where rows carry one) that no feedback row names
    (by tenant and request id), a seeded `fraction` of them (the same requests on every call). An
    escalated answer is the teacher's own: grading it would say nothing of the student; a tool-using
    conversation's is not graded without its tools."""
    from loop.traces.log import tool_traffic

    rated = {(f.get("tenant"), f.get("request_id")) for f in feedback}
    return [r for r in rows if r.get("status", 200) == 200 and (r["tenant"], r["request_id"]) not in rated
            and r.get("completion") and not r.get("escalated") and not tool_traffic(r)
            and random.Random(r["request_id"]).random() < fraction]


def judge_unrated(cfg: OutcomeJudgeConfig, rows: list[dict], feedback: list[dict], judge, append) -> Judged:
    """Grade the unrated requests of `rows` with `judge` (a TeacherJudge) and `append` the grades as
    feedback rows; stops at `cfg.max_requests` grades or when the judge's cost reaches `cfg.budget_usd`."""
    import json

    todo = unrated(rows, feedback, cfg.sample_fraction)
    out, start = Judged(candidates=len(todo)), judge.usage.cost_usd
    tokens = judge.usage.prompt_tokens + judge.usage.completion_tokens
    grades = []
    for r in todo:
        if out.graded >= cfg.max_requests:
            out.stopped = "max_requests"
            break
        if judge.usage.cost_usd - start >= cfg.budget_usd:
            out.stopped = "budget"
            break
        failed = judge.usage.failed
        asked = json.loads(r["prompt"])  # a chat's messages, or a completion's prompt text
        asked = [{"role": "user", "content": asked}] if isinstance(asked, str) else asked
        score = judge.grade(asked, r["completion"])
        if judge.usage.failed > failed:
            out.failed += 1  # no grade: not an outcome
        else:
            grades.append({"request_id": r["request_id"], "tenant": r["tenant"], "score": score, "label": None,
                           "ts": time.time(), "source": "judge"})
        out.graded += 1
    if grades:
        append(grades)
    out.cost_usd = judge.usage.cost_usd - start
    out.tokens = judge.usage.prompt_tokens + judge.usage.completion_tokens - tokens
    return out
