"""What every stage of a cycle is handed: the config, the cluster's services, the endpoint, the
cycle's number and directory, its report, the demo's simulated users (None on real traffic) and
where progress lines go."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from loop.cluster import Services
from loop.config import EndpointConfig, LoopConfig
from loop.cycle.report import CycleReport


@dataclass
class CycleContext:
    cfg: LoopConfig
    services: Services
    endpoint: EndpointConfig
    number: int
    dir: Path
    """storage.root/cycles/<endpoint>/cycle-NNNN: one directory per stage under it."""
    report: CycleReport
    users: object | None = None
    """The demo's simulated users (loop/sim/users.py), or None: real traffic."""
    progress: Callable[[str], None] = print

    @property
    def lineage(self):
        return self.services.lineage

    @property
    def simulate(self) -> bool:
        return self.users is not None

    @property
    def epoch(self) -> int:
        """The world epoch the cycle runs in (the demo's; a real cycle's number)."""
        return self.number
