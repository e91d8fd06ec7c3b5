"""The demo's drifting world as a client of the loop: the one door between product and simulation.

A config with `traffic.simulate: true` names this class in `traffic.simulator`; the services load it
by that import path (the product never imports loop.sim). It starts the reference teacher, an
OpenAI-compatible Serve app that knows the world's current epoch, moves it on at every cycle, gives
each cycle its simulated users (loop/sim/users.py: the `openai` client against the gateway,
`/v1/feedback`, the world's facts written as evaluation suites), and at setup makes the tiny test
model's vocabulary and the demo's cycle-0 student (`world.bootstrap`).
"""
from __future__ import annotations

from pathlib import Path

from loop.config import EndpointConfig, LoopConfig


class SimulatedWorld:
    def __init__(self, cfg: LoopConfig):
        self.cfg = cfg
        self.teacher_epoch: int | None = None

    # --- serving: the frontier stand-in -----------------------------------------------------------
    def start_teacher(self, epoch: int) -> str:
        """Deploy the reference teacher at `epoch`; returns its OpenAI base URL."""
        from loop.sim.teacher import deploy_teacher

        url = deploy_teacher(self.cfg, epoch)
        self.teacher_epoch = epoch
        return url

    def before_cycle(self, epoch: int) -> None:
        """The world moves on with every cycle: the frontier learns it first (a redeploy)."""
        if self.cfg.teacher.kind == "reference" and self.teacher_epoch != epoch:
            self.start_teacher(epoch)

    def users(self, services, endpoint: EndpointConfig, number: int, api_key: str, progress=print):
        from loop.sim.users import SimulatedUsers
        from loop.sim.world import World

        w = self.cfg.world
        world = World(w.seed, number, w.num_entities, w.drift_fraction, w.new_per_epoch)
        return SimulatedUsers(self.cfg, services, endpoint, world, number, api_key, progress)

    # --- setup: the models ------------------------------------------------------------------------
    def corpus(self) -> list[str]:
        """Every question and answer of the world at epoch 0: the tiny test tokenizer's vocabulary."""
        from loop.sim.world import World

        w = self.cfg.world
        return World(w.seed, 0, w.num_entities).corpus()

    def fetched_base_dir(self, student_dir: Path) -> Path:
        """Where the fetched base goes: beside the cycle-0 student with `world.bootstrap`, else the student."""
        b = self.cfg.world.bootstrap
        if not b:
            return student_dir
        return self.cfg.storage.path(b.base_path) if b.base_path else student_dir.with_name(student_dir.name + "-base")

    def prepare_student(self, base_dir: Path, student_dir: Path, force: bool = False) -> None:
        """With `world.bootstrap`: the cycle-0 student, the fetched base taught the world at its epoch
        (rebuilt when anything it depends on changed)."""
        if not self.cfg.world.bootstrap:
            return
        from loop.models.fetch import MANIFEST, read_manifest
        from loop.sim.bootstrap import bootstrap_key, bootstrap_student

        key = bootstrap_key(self.cfg, read_manifest(base_dir)["digest"])
        if force or not (student_dir / MANIFEST).exists() or read_manifest(student_dir).get("bootstrap_key") != key:
            bootstrap_student(self.cfg, base_dir, student_dir, key)
