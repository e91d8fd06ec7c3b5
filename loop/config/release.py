"""How a new version goes live: the A/B rollout, the promotion controller's evidence rules, and when
`--forever` starts the next cycle."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from loop.config.base import Section


class RolloutConfig(Section):
    challenger_weight: float = Field(default=0.1, ge=0, le=1)
    """Share of users routed to a challenger (used from the serving issue on)."""


class PromotionConfig(Section):
    """How a validated version goes live and when it replaces the champion (loop/control/decision.py)."""
    mode: Literal["canary", "direct"] = "canary"
    """`canary`: deploy as challenger at rollout.challenger_weight and let live evidence decide;
    `direct`: make it champion as soon as it passes the gate."""
    min_samples: int = Field(default=30, ge=1)
    """Outcomes (feedback or shadow agreement) each variant needs before any verdict; also the
    challenger requests before its guardrails apply."""
    max_samples: int = Field(default=1000, ge=1)
    """Challenger outcomes after which an undecided comparison ends as `inconclusive`."""
    promote_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """P(challenger's success rate > champion's) at or above which it is promoted."""
    rollback_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """P(challenger worse) at or above which it is rolled back."""
    inconclusive: Literal["promote", "rollback"] = "rollback"
    positive_score: float = 0.5
    """A feedback score (or shadow token F1 with the teacher) at or above this is a success."""
    shadow_fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of answered requests without feedback that the teacher also answers (agreement outcome)."""
    max_error_rate_delta: float = Field(default=0.02, ge=0, le=1)
    max_latency_p95_ratio: float = Field(default=2.0, ge=1)
    max_escalation_rate_delta: float = Field(default=0.1, ge=0, le=1)
    canary_rounds: int = Field(default=6, ge=1)
    """Simulated worlds: rounds of user traffic (with the feedback oracle) a cycle's canary stage sends
    before it leaves an undecided challenger to the driver's later steps."""
    canary_wait_s: float = Field(default=900, ge=0)
    """Real traffic: how long a cycle's canary stage waits for a verdict before leaving an undecided
    challenger to `loopctl run --forever`."""
    check_interval_s: float = Field(default=30, gt=0)
    """`--forever`: how often the driver re-decides each live challenger."""


class ScheduleConfig(Section):
    """When `loopctl run --forever` starts an endpoint's next cycle: enough new traces, or a timer."""
    min_new_traces: int = Field(default=200, ge=1)
    interval_s: float | None = Field(default=None, gt=0)
    """Start a cycle at least this often (if any new trace arrived); None: traces only."""
    poll_s: float = Field(default=10, gt=0)
