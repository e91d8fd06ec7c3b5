"""The teacher as a judge: it grades an answer to a conversation against a rubric (and a reference
when there is one) with an integer 0-10. Calls go through `OpenAITeacher`, so they are cached (a
re-run never pays twice) and their tokens and cost are counted here. Used by the gate's `judge` grader."""
from __future__ import annotations

import re
from dataclasses import dataclass

from loop.config import JudgeConfig, TeacherConfig


@dataclass
class JudgeUsage:
    calls: int = 0
    cached: int = 0
    failed: int = 0
    """Grades the teacher did not give (an error or no integer 0-10 in its reply): scored 0."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0


def judge_messages(rubric: str, conversation: list[dict], answer: str, reference: str | None) -> list[dict]:
    asked = "\n".join(f"{m['role'].upper()}: {m['content']}" for m in conversation)
    parts = [f"USER QUESTION (the conversation so far):\n{asked}"]
    if reference:
        parts.append(f"REFERENCE:\n{reference}")
    parts.append(f"ASSISTANT ANSWER:\n{answer}")
    return [{"role": "system", "content": rubric}, {"role": "user", "content": "\n\n".join(parts)}]


def parse_grade(text: str) -> int | None:
    """The first integer 0-10 in the judge's reply (None when there is none)."""
    m = re.search(r"\b(10|[0-9])\b", text or "")
    return int(m.group(1)) if m else None


class TeacherJudge:
    def __init__(self, teacher: TeacherConfig, base_url: str, api_key: str, cfg: JudgeConfig,
                 cache_path: str | None = None):
        from loop.teacher.client import OpenAITeacher

        # Its own parameters (a few tokens, no log-probabilities): cache keys never collide with labels'.
        asked = teacher.model_copy(update={"max_tokens": cfg.max_tokens, "top_logprobs": 0})
        self.teacher = OpenAITeacher(asked, base_url, api_key, cache_path, namespace="judge")
        self.cfg, self.usage = cfg, JudgeUsage()

    def grade(self, conversation: list[dict], answer: str, reference: str | None = None) -> float:
        """The answer's score in [0, 1]: grade / 10, or pass / fail at `judge.pass_score`."""
        label = self.teacher.label(judge_messages(self.cfg.rubric, conversation, answer, reference))
        u = self.usage
        u.calls += 1
        u.cached += label.cached
        u.prompt_tokens += label.prompt_tokens
        u.completion_tokens += label.completion_tokens
        u.cost_usd += label.cost_usd
        got = None if label.error else parse_grade(label.completion)
        if got is None:
            u.failed += 1
            return 0.0
        score = got / 10
        return score if self.cfg.pass_score is None else float(score >= self.cfg.pass_score)

    def __call__(self, item, answer: str) -> float:
        """The `judge` grader of loop/suites.py."""
        return self.grade(item.conversation, answer, item.reference)


def outcome_judge(cfg, teacher_url: str) -> TeacherJudge:
    """`data.judge`'s grader: the loop's HTTP teacher (config check refuses a local one with it),
    its answers cached beside the labels'."""
    from loop.teacher.client import teacher_key

    return TeacherJudge(cfg.teacher, teacher_url, teacher_key(cfg.teacher), cfg.data.judge,
                        str(cfg.storage.path("teacher-cache.sqlite")))
