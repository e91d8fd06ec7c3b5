"""The promotion rule: per-variant telemetry from the trace log in, promote / roll back / keep collecting out.

Each answered request of a variant is an outcome when it has one: the user's feedback score (joined
by (tenant, request id), so a tenant's feedback grades only its own requests; a score >=
`positive_score` is a success), else the teacher's agreement with the answer on the shadow sample
(token F1 >= `positive_score`). Outcomes are Bernoulli; with a uniform
prior each variant's success rate has a Beta(1 + successes, 1 + failures) posterior, and

    P(challenger better) = P(p_challenger > p_champion)

is computed exactly enough (numerical integration on a fine grid; deterministic, no sampling).
The rule, in order:
  1. guardrails, once the challenger has `min_samples` answered requests: its error rate above the
     champion's by more than `max_error_rate_delta`, its latency p95 above `max_latency_p95_ratio` x the
     champion's, or its escalation rate above the champion's by more than `max_escalation_rate_delta`
     -> roll back;
  2. fewer than `min_samples` outcomes on either side -> keep collecting;
  3. P(better) >= `promote_confidence` -> promote; P(worse) >= `rollback_confidence` -> roll back;
  4. `max_samples` challenger outcomes without either -> `inconclusive` (promote or roll back);
  5. otherwise keep collecting.
Pure functions of the rows: the controller reads the rows and acts on the decision.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from loop.config import PromotionConfig


@dataclass
class VariantStats:
    version: str
    requests: int = 0
    """Answered or failed requests traced for this version since the challenger went live."""
    errors: int = 0
    """Requests that ended in a 5xx."""
    escalations: int = 0
    latency_p95_ms: float = 0.0
    successes: int = 0
    failures: int = 0
    feedback: int = 0
    """Outcomes from user feedback (the rest are from shadow agreement)."""

    @property
    def outcomes(self) -> int:
        return self.successes + self.failures

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def escalation_rate(self) -> float:
        ok = self.requests - self.errors
        return self.escalations / ok if ok else 0.0

    @property
    def success_rate(self) -> float:
        return self.successes / self.outcomes if self.outcomes else float("nan")

    def to_dict(self) -> dict:
        return {**asdict(self), "outcomes": self.outcomes, "error_rate": self.error_rate,
                "escalation_rate": self.escalation_rate, "success_rate": self.success_rate}


@dataclass
class Decision:
    action: str
    """`promote`, `rollback` or `continue`."""
    reasons: list[str] = field(default_factory=list)
    p_better: float = float("nan")
    champion: dict = field(default_factory=dict)
    challenger: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def p95(values: list[float]) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, math.ceil(0.95 * len(s)) - 1)]


def variant_stats(version: str, rows: list[dict], scores: dict[tuple[str, str], float],
                  agreement: dict[tuple[str, str], float], positive_score: float) -> VariantStats:
    """`rows`: this version's trace records; `scores`: feedback score by (tenant, request id);
    `agreement`: shadow agreement (token F1 with the teacher) by (tenant, request id)."""
    st = VariantStats(version)
    latencies = []
    for r in rows:
        st.requests += 1
        status = r.get("status", 200)
        if status >= 500:
            st.errors += 1
            continue
        if status >= 400:
            continue  # the client's doing (a bad request, or it hung up: 499): no latency, no outcome
        latencies.append(float(r.get("latency_ms", 0.0)))
        if r.get("escalated"):
            # The user got the teacher's answer: a grade of it says nothing of this version's answers.
            st.escalations += 1
            continue
        key = (r.get("tenant", ""), r.get("request_id", ""))
        if key in scores:
            st.feedback += 1
            outcome = scores[key]
        elif key in agreement:
            outcome = agreement[key]
        else:
            continue
        if outcome >= positive_score:
            st.successes += 1
        else:
            st.failures += 1
    st.latency_p95_ms = p95(latencies)
    return st


def _log_beta_pdf(x: float, a: float, b: float) -> float:
    return (a - 1) * math.log(x) + (b - 1) * math.log1p(-x) - (math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b))


def p_better(challenger: VariantStats, champion: VariantStats, grid: int = 4000) -> float:
    """P(p_challenger > p_champion) under Beta(1+s, 1+f) posteriors: the integral over x of the
    challenger's density times the champion's CDF, by the midpoint rule on `grid` points."""
    a1, b1 = 1 + challenger.successes, 1 + challenger.failures
    a2, b2 = 1 + champion.successes, 1 + champion.failures
    h = 1.0 / grid
    total, cdf2 = 0.0, 0.0
    for i in range(grid):
        x = (i + 0.5) * h
        f2 = math.exp(_log_beta_pdf(x, a2, b2)) * h
        # The champion's CDF at x: everything below x, plus half of this cell.
        total += math.exp(_log_beta_pdf(x, a1, b1)) * h * (cdf2 + f2 / 2)
        cdf2 += f2
    return min(1.0, max(0.0, total / cdf2 if cdf2 else 0.5))


def decide(champion: VariantStats, challenger: VariantStats, cfg: PromotionConfig) -> Decision:
    d = Decision("continue", champion=champion.to_dict(), challenger=challenger.to_dict())
    if challenger.requests >= cfg.min_samples:
        if challenger.error_rate > champion.error_rate + cfg.max_error_rate_delta:
            d.reasons.append(f"guardrail: challenger error rate {challenger.error_rate:.3f} vs champion "
                             f"{champion.error_rate:.3f} (promotion.max_error_rate_delta {cfg.max_error_rate_delta})")
        if champion.latency_p95_ms and challenger.latency_p95_ms > cfg.max_latency_p95_ratio * champion.latency_p95_ms:
            d.reasons.append(f"guardrail: challenger latency p95 {challenger.latency_p95_ms:.0f} ms vs champion "
                             f"{champion.latency_p95_ms:.0f} ms (promotion.max_latency_p95_ratio "
                             f"{cfg.max_latency_p95_ratio})")
        if challenger.escalation_rate > champion.escalation_rate + cfg.max_escalation_rate_delta:
            d.reasons.append(f"guardrail: challenger escalation rate {challenger.escalation_rate:.3f} vs champion "
                             f"{champion.escalation_rate:.3f} (promotion.max_escalation_rate_delta "
                             f"{cfg.max_escalation_rate_delta})")
        if d.reasons:
            d.action = "rollback"
            return d
    if min(champion.outcomes, challenger.outcomes) < cfg.min_samples:
        d.reasons.append(f"collecting: {challenger.outcomes} challenger and {champion.outcomes} champion outcomes, "
                         f"promotion.min_samples {cfg.min_samples} each")
        return d
    d.p_better = p_better(challenger, champion)
    rates = (f"success {challenger.success_rate:.3f} ({challenger.outcomes}) vs champion {champion.success_rate:.3f} "
             f"({champion.outcomes}); P(challenger better) = {d.p_better:.4f}")
    if d.p_better >= cfg.promote_confidence:
        d.action = "promote"
        d.reasons.append(f"better: {rates} >= promotion.promote_confidence {cfg.promote_confidence}")
    elif 1 - d.p_better >= cfg.rollback_confidence:
        d.action = "rollback"
        d.reasons.append(f"worse: {rates}; P(worse) >= promotion.rollback_confidence {cfg.rollback_confidence}")
    elif challenger.outcomes >= cfg.max_samples:
        d.action = cfg.inconclusive
        d.reasons.append(f"inconclusive after promotion.max_samples {cfg.max_samples}: {rates}; "
                         f"promotion.inconclusive is {cfg.inconclusive}")
    else:
        d.reasons.append(f"collecting: {rates}")
    return d
