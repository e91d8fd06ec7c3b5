"""The promotion rule on simulated traffic: a better challenger is promoted, a worse one rolled back,
a guardrail breach rolls back before any verdict on quality, and too little evidence waits."""
import random

import pytest

from loop.config import PromotionConfig
from loop.control.decision import decide, p_better, p95, variant_stats, VariantStats


def _traffic(version, n, success_rate, seed, error_rate=0.0, latency_ms=100.0, escalate=0.0):
    """n simulated requests with feedback: rows as the trace log has them, scores by (tenant, request id)."""
    rng = random.Random(seed)
    rows, scores = [], {}
    for i in range(n):
        rid = f"{version}-{i}"
        failed = rng.random() < error_rate
        rows.append({"request_id": rid, "tenant": "acme", "model_version": version, "status": 503 if failed else 200,
                     "latency_ms": latency_ms * (0.5 + rng.random()), "escalated": rng.random() < escalate})
        if not failed:
            scores[("acme", rid)] = 1.0 if rng.random() < success_rate else 0.0
    return rows, scores


def _stats(version, n, rate, seed, **kw):
    rows, scores = _traffic(version, n, rate, seed, **kw)
    return variant_stats(version, rows, scores, {}, 0.5)


def test_p_better_is_a_probability_with_the_right_symmetry():
    a, b = VariantStats("a", successes=30, failures=10), VariantStats("b", successes=10, failures=30)
    assert p_better(a, b) > 0.999 and p_better(b, a) < 0.001
    assert p_better(a, a) == pytest.approx(0.5, abs=1e-3)
    # Against a Monte Carlo estimate on a close comparison.
    c, d = VariantStats("c", successes=22, failures=18), VariantStats("d", successes=18, failures=22)
    rng = random.Random(0)
    mc = sum(rng.betavariate(23, 19) > rng.betavariate(19, 23) for _ in range(200_000)) / 200_000
    assert p_better(c, d) == pytest.approx(mc, abs=0.005)


def test_a_better_challenger_is_promoted_and_a_worse_one_rolled_back():
    cfg = PromotionConfig(min_samples=30)
    champion = _stats("v1", 200, 0.5, seed=1)
    better = decide(champion, _stats("v2", 200, 0.8, seed=2), cfg)
    assert better.action == "promote" and better.p_better >= 0.95, better
    worse = decide(champion, _stats("v3", 200, 0.2, seed=3), cfg)
    assert worse.action == "rollback" and worse.p_better <= 0.05, worse
    assert "worse" in worse.reasons[0]


def test_too_little_evidence_keeps_collecting():
    cfg = PromotionConfig(min_samples=30)
    d = decide(_stats("v1", 200, 0.5, seed=1), _stats("v2", 20, 1.0, seed=2), cfg)
    assert d.action == "continue" and "min_samples" in d.reasons[0]
    # Enough samples but a near tie: keep collecting until max_samples, then the configured outcome.
    tie = decide(_stats("v1", 300, 0.5, seed=1), _stats("v2", 60, 0.5, seed=5), cfg)
    assert tie.action == "continue" and 0.05 < tie.p_better < 0.95
    ended = decide(_stats("v1", 300, 0.5, seed=1), _stats("v2", 60, 0.5, seed=5),
                   cfg.model_copy(update={"max_samples": 50, "inconclusive": "rollback"}))
    assert ended.action == "rollback" and "inconclusive" in ended.reasons[0]


@pytest.mark.parametrize("kw,word", [({"error_rate": 0.2}, "error rate"), ({"latency_ms": 1000.0}, "latency"),
                                     ({"escalate": 0.5}, "escalation")])
def test_guardrails_roll_back_even_a_better_challenger(kw, word):
    cfg = PromotionConfig(min_samples=30)
    d = decide(_stats("v1", 200, 0.5, seed=1), _stats("v2", 200, 0.9, seed=2, **kw), cfg)
    assert d.action == "rollback" and word in d.reasons[0], d


def test_variant_stats_count_what_the_trace_log_holds():
    rows = [{"request_id": "a", "tenant": "t", "status": 200, "latency_ms": 10, "escalated": False},
            {"request_id": "b", "tenant": "t", "status": 200, "latency_ms": 30, "escalated": True},
            {"request_id": "c", "tenant": "t", "status": 500, "latency_ms": 0, "escalated": False},
            {"request_id": "d", "tenant": "t", "status": 200, "latency_ms": 20, "escalated": False},
            {"request_id": "e", "tenant": "t", "status": 200, "latency_ms": 20, "escalated": False}]
    st = variant_stats("v", rows, {("t", "a"): 1.0, ("t", "b"): 1.0, ("t", "e"): 0.0}, {("t", "d"): 0.9}, 0.5)
    # b's grade is of the teacher's answer (escalated): it counts as an escalation, not an outcome.
    assert (st.requests, st.errors, st.escalations, st.successes, st.failures, st.feedback) == (5, 1, 1, 2, 1, 2)
    assert st.latency_p95_ms == 30 and st.escalation_rate == pytest.approx(1 / 4)
    assert p95(list(range(1, 101))) == 95
    # A client that hung up (499) or sent a bad request (4xx) says nothing of the version: no
    # latency, no outcome, even with a score posted for it.
    gone = rows + [{"request_id": "f", "tenant": "t", "status": 499, "latency_ms": 9000, "escalated": False}]
    st = variant_stats("v", gone, {("t", "a"): 1.0, ("t", "b"): 1.0, ("t", "e"): 0.0, ("t", "f"): 0.0},
                       {("t", "d"): 0.9}, 0.5)
    assert (st.requests, st.successes, st.failures, st.latency_p95_ms) == (6, 2, 1, 30)


def test_feedback_counts_only_for_its_own_tenants_requests():
    from loop.control.controller import feedback_scores

    cfg = PromotionConfig(min_samples=30)
    champion_rows, champion_scores = _traffic("v1", 200, 0.5, seed=1)
    rows, _ = _traffic("v2", 200, 0.5, seed=2)
    acme = [{"request_id": r["request_id"], "tenant": "acme", "score": 0.5 + 0.5 * (i % 2), "ts": 10.0}
            for i, r in enumerate(rows)]
    honest = decide(variant_stats("v1", champion_rows, champion_scores, {}, 0.6),
                    variant_stats("v2", rows, feedback_scores(acme, since=5.0), {}, 0.6), cfg)
    assert (honest.challenger["successes"], honest.challenger["failures"]) == (100, 100)
    # Another tenant posts perfect scores naming every one of acme's challenger requests, later (so
    # it would win a join by request id alone), and rows from before feedback had a tenant do too.
    forged = acme + [{"request_id": r["request_id"], "tenant": "globex", "score": 1.0, "ts": 20.0} for r in rows]
    forged += [{"request_id": r["request_id"], "score": 1.0, "ts": 30.0} for r in rows]
    scores = feedback_scores(forged, since=5.0)
    assert len(scores) == 400 and sum(k[0] == "acme" for k in scores) == 200
    attacked = decide(variant_stats("v1", champion_rows, champion_scores, {}, 0.6),
                      variant_stats("v2", rows, scores, {}, 0.6), cfg)
    assert attacked.to_dict() == honest.to_dict(), "the controller's view is unchanged"
    # Feedback from before the challenger went live does not count.
    assert feedback_scores(acme, since=11.0) == {}


def test_the_same_request_id_in_two_tenants_does_not_cross():
    rows = [{"request_id": "req-1", "tenant": "acme", "status": 200, "latency_ms": 10},
            {"request_id": "req-1", "tenant": "globex", "status": 200, "latency_ms": 10}]
    acme_only = variant_stats("v", rows, {("acme", "req-1"): 1.0}, {("globex", "req-1"): 0.1}, 0.5)
    assert (acme_only.successes, acme_only.failures, acme_only.feedback) == (1, 1, 1)
    both = variant_stats("v", rows, {("acme", "req-1"): 1.0, ("globex", "req-1"): 0.0}, {}, 0.5)
    assert (both.successes, both.failures, both.feedback) == (1, 1, 2)
