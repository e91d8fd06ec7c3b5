"""Simulated users: they ask the world's questions through the gateway with the `openai` client.

Users are sticky ids (`user` field), so rollouts can assign them to arms. A round of traffic is every
training phrasing of every fact once, then (with `requests`) popular facts asked again and routine
questions the student already answers (`routine_share` of the round). Evaluation traffic uses the
user id prefix `loop-eval`, which prompt selection excludes: held-out phrasings never train.
"""
from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from loop.sim.world import ROUTINE_QUESTIONS, Fact, states

from loop.traces.log import EVAL_USER  # noqa: F401 - re-exported for the simulation's callers


@dataclass(frozen=True)
class Routine:
    """A routine question: right when the answer states `value`."""
    question: str
    value: str


@dataclass
class Answer:
    fact: Fact | Routine
    question: str
    text: str
    request_id: str
    model_version: str
    variant: str

    @property
    def correct(self) -> bool:
        return states(self.fact.value, self.text)


def ask_gateway(base_url: str, api_key: str, model: str, items: list[tuple[Fact | Routine, str, str]], max_tokens: int,
                concurrency: int) -> list[Answer]:
    """Send (fact, question, user) items concurrently; every answer carries the serving headers."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key, max_retries=2, timeout=120)

    def one(item):
        fact, question, user = item
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
            temperature=0, user=user)
        resp = raw.parse()
        return Answer(fact, question, resp.choices[0].message.content or "", raw.headers.get("x-request-id", ""),
                      raw.headers.get("x-model-version", ""), raw.headers.get("x-variant", ""))

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, items))


def user_traffic(facts: list[Fact], users: int, seed: int, requests: int = 0,
                 routine_share: float = 0.0) -> list[tuple[Fact | Routine, str, str]]:
    """One round of `users` sticky users' questions, shuffled: every training phrasing of every fact
    once; then, up to `requests` in all, routine questions (`routine_share` of the round) and popular
    facts asked again (an entity's popularity is 1/rank, its rank fixed by its name)."""
    rng = random.Random(seed)
    items: list[tuple[Fact | Routine, str]] = [(f, q) for f in facts for q in f.train_questions()]
    routine = min(round(requests * routine_share), max(0, requests - len(items)))
    items += [(Routine(q, v), q) for q, v in (rng.choice(ROUTINE_QUESTIONS) for _ in range(routine))]
    by_rank = sorted(facts, key=lambda f: hashlib.sha256(f.entity.encode()).hexdigest())
    weights = [1 / (rank + 1) for rank in range(len(by_rank))]
    for f in rng.choices(by_rank, weights, k=max(0, requests - len(items))):
        items.append((f, rng.choice(f.train_questions())))
    rng.shuffle(items)
    return [(fact, q, f"sim-user-{rng.randrange(users)}") for fact, q in items]


def eval_traffic(facts: list[Fact]) -> list[tuple[Fact, str, str]]:
    return [(f, f.heldout_question(), EVAL_USER) for f in facts]


def post_feedback(base_url: str, api_key: str, answers: list[Answer]) -> int:
    """The feedback oracle: grades each answer against the world (1.0 right, 0.0 wrong) and posts it
    to the gateway's `/v1/feedback`, as a client application would. Returns how many were recorded."""
    import httpx

    recorded = 0
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=30) as client:
        for a in answers:
            if a.request_id:
                r = client.post("/feedback", json={"request_id": a.request_id, "score": 1.0 if a.correct else 0.0})
                recorded += r.status_code == 200
    return recorded
