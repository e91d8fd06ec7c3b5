"""What every endpoint serves right now: champion, challenger and weight, versioned.

The driver (reconciling MLflow's aliases) writes it; gateway replicas read it on the request path at
most every `POLL_S`, so a new version or weight is live within that time on every replica, without
restarting anything. A plain class; the driver runs it as one named Ray actor.
"""
from __future__ import annotations

POLL_S = 0.2


class RolloutStore:
    def __init__(self):
        self.version, self.rollouts = 0, {}

    def set(self, rollouts: dict) -> int:
        self.version, self.rollouts = self.version + 1, dict(rollouts)
        return self.version

    def get(self, since: int = -1) -> tuple[int, dict] | None:
        """The rollouts if they changed after version `since`, else None (cheap to poll)."""
        return None if since == self.version else (self.version, self.rollouts)
