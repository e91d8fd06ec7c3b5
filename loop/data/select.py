"""Which served prompts the teacher labels: the ones that matter, deduplicated, with a held-out split.

From the trace records of one endpoint since the last cycle (answered, not evaluation traffic), a
prompt is chosen, in this order, because
  1. the cascade escalated it (the student was unsure and the teacher answered),
  2. the student's confidence (mean token log-probability) was below `min_confidence`,
  3. a user's feedback on it was negative (score below `negative_score`, or a negative label),
  4. it is in a sample of the rest, stratified by user so no single user dominates,
up to `max_prompts`. Identical prompts count once (with every reason they earned). A stable hash of
the prompt puts `heldout_fraction` of them aside: never trained on, kept for validation.
Feedback joins a trace record by (tenant, request id): a tenant's feedback says nothing of another
tenant's requests, and a feedback row without a tenant (from before feedback was scoped) of none.
"""
from __future__ import annotations

import hashlib
import random
import re
from collections import defaultdict
from dataclasses import dataclass, field

NEGATIVE_LABELS = {"bad", "wrong", "incorrect", "thumbs_down", "negative", "unhelpful"}
REASONS = ("escalated", "low_confidence", "negative_feedback", "sampled")


@dataclass
class Selection:
    train: list[dict] = field(default_factory=list)
    """{"prompt": <messages JSON>, "reasons": [...]} chosen for labelling and training."""
    heldout: list[dict] = field(default_factory=list)
    counts: dict = field(default_factory=dict)
    """How many prompts each reason chose, and how many candidates there were."""


def _heldout(prompt: str, fraction: float) -> bool:
    return fraction > 0 and int(hashlib.sha256(prompt.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < fraction


def _key(row: dict) -> tuple[str, str]:
    return row.get("tenant") or "", row.get("request_id") or ""


def _keyed(feedback: list[dict], keep) -> set[tuple[str, str]]:
    """(tenant, request id) of the feedback rows `keep` accepts; rows without a tenant join nothing."""
    return {_key(fb) for fb in feedback if fb.get("tenant") and keep(fb)}


def _negative(fb: dict, negative_score: float) -> bool:
    score, label = fb.get("score"), fb.get("label")
    return (score is not None and score < negative_score) or (isinstance(label, str)
                                                              and label.strip().lower() in NEGATIVE_LABELS)


def select_prompts(records: list[dict], feedback: list[dict], *, max_prompts: int, sample_size: int,
                   min_confidence: float | None = None, negative_score: float = 0.5,
                   heldout_fraction: float = 0.0, seed: int = 0) -> Selection:
    """`records`: trace rows (prompt, user, tenant, request_id, escalated, confidence) already filtered to
    the endpoint's new, answered, non-evaluation traffic. `feedback`: rows of {tenant, request_id, score,
    label}."""
    negative = _keyed(feedback, lambda fb: _negative(fb, negative_score))
    reasons: dict[str, set[str]] = defaultdict(set)
    users: dict[str, str] = {}
    for r in records:
        prompt = r["prompt"]
        users.setdefault(prompt, r.get("user", ""))
        if r.get("escalated"):
            reasons[prompt].add("escalated")
        conf = r.get("confidence")
        if min_confidence is not None and conf and conf < min_confidence:  # 0.0: not measured
            reasons[prompt].add("low_confidence")
        if _key(r) in negative:
            reasons[prompt].add("negative_feedback")
    candidates = sorted(users)
    rest = [p for p in candidates if p not in reasons]
    for p in _stratified(rest, users, sample_size, seed):
        reasons[p].add("sampled")
    chosen = sorted(reasons, key=lambda p: (min(REASONS.index(x) for x in reasons[p]), p))[:max_prompts]
    out = Selection(counts={"candidates": len(candidates), **{x: 0 for x in REASONS}})
    for p in chosen:
        row = {"prompt": p, "reasons": sorted(reasons[p], key=REASONS.index)}
        (out.heldout if _heldout(p, heldout_fraction) else out.train).append(row)
        for x in row["reasons"]:
            out.counts[x] += 1
    out.counts.update(train=len(out.train), heldout=len(out.heldout))
    return out


def _stratified(prompts: list[str], users: dict[str, str], n: int, seed: int) -> list[str]:
    """Up to `n` prompts, round-robin over users (each user's prompts shuffled), so heavy users do
    not crowd out the rest."""
    if n <= 0 or not prompts:
        return []
    rng = random.Random(seed)
    by_user: dict[str, list[str]] = defaultdict(list)
    for p in prompts:
        by_user[users[p]].append(p)
    queues = [rng.sample(ps, len(ps)) for _, ps in sorted(by_user.items())]
    rng.shuffle(queues)
    picked = []
    while len(picked) < n and any(queues):
        for q in queues:
            if q and len(picked) < n:
                picked.append(q.pop())
    return picked


def replay_rows(earlier: list[str], current: list[str], n: int, seed: int) -> list[str]:
    """`n` dataset lines (JSONL rows) drawn from earlier cycles' `earlier`, seeded. A prompt the current
    dataset `current` labels again is left out: its newer answer supersedes the old one, which
    replay would otherwise teach back (a fact that changed)."""
    import json

    relabelled = {json.dumps(json.loads(line)["messages"], sort_keys=True) for line in current}
    pool = [line for line in dict.fromkeys(earlier)
            if json.dumps(json.loads(line)["messages"], sort_keys=True) not in relabelled]
    return random.Random(seed).sample(pool, min(n, len(pool))) if n > 0 else []


def rated_good(records: list[dict], feedback: list[dict], exclude: set[str], n: int, min_score: float,
               seed: int) -> list[dict]:
    """Up to `n` served answers that feedback scored at least `min_score`, one per prompt, not
    escalated (the answer was the teacher's) and whose prompt is not in `exclude` (labelled by the
    teacher this cycle, or held out): {"prompt", "completion"} rows (its first sentence), seeded."""
    if n <= 0:
        return []
    good = _keyed(feedback, lambda fb: fb.get("score") is not None and fb["score"] >= min_score)
    bad_prompts = {r["prompt"] for r in records if _key(r) not in good}
    by_prompt = {r["prompt"]: r for r in records
                 if _key(r) in good and not r.get("escalated") and r.get("completion")}
    pool = sorted(p for p in by_prompt if p not in exclude and p not in bad_prompts)
    picked = random.Random(seed).sample(pool, min(n, len(pool)))
    return [{"prompt": p, "completion": first_sentence(by_prompt[p]["completion"])} for p in sorted(picked)]


def first_sentence(text: str) -> str:
    """The answer up to its first sentence's end: a prefix of what was said (it is trained without an
    end-of-turn token), which carries the answer at a fraction of a rambling answer's tokens."""
    found = re.search(r"[.!?](\s|$)", text)
    return text[:found.start() + 1] if found else text
