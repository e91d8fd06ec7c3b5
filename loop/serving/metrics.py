"""The gateway's Prometheus metrics, per endpoint and variant, through Ray Serve's metrics API (the
Ray dashboard's Metrics view; Prometheus at the node's metrics port). Built in a Serve replica only:
`ray.serve.metrics` needs one.
"""
from __future__ import annotations


class GatewayMetrics:
    """Requests (by status), errors, escalations, tokens and latency of every answered or refused call."""

    def __init__(self):
        from ray.serve.metrics import Counter, Histogram

        keys = ("endpoint", "variant")
        self.requests = Counter("loop_requests", "Requests served", tag_keys=keys + ("status",))
        self.errors = Counter("loop_errors", "Requests answered with an error", tag_keys=keys + ("status",))
        self.escalations = Counter("loop_escalations", "Requests escalated to the teacher", tag_keys=keys)
        self.tokens = Counter("loop_tokens", "Tokens processed", tag_keys=keys + ("kind",))
        self.latency = Histogram("loop_latency_ms", "End-to-end latency",
                                 boundaries=[10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000], tag_keys=keys)

    def observe(self, endpoint, variant, status, prompt_tokens, completion_tokens, latency_ms,
                escalated: bool = False) -> None:
        tags = {"endpoint": endpoint, "variant": variant}
        self.requests.inc(tags={**tags, "status": str(status)})
        if status >= 400:
            self.errors.inc(tags={**tags, "status": str(status)})
        if escalated:
            self.escalations.inc(tags=tags)
        for kind, n in (("prompt", prompt_tokens), ("completion", completion_tokens)):
            if n:  # Counter.inc refuses 0
                self.tokens.inc(n, tags={**tags, "kind": kind})
        self.latency.observe(latency_ms, tags=tags)
