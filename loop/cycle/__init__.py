"""One generation of the loop for one endpoint, stage by stage, each stage's output on disk.

traffic -> label -> train -> merge -> draft -> validate -> register -> deploy -> canary -> evaluate
(`label` selects the served prompts that matter, then has the teacher label them). `traffic` sends the
demo's simulated users, or, on real traffic (`traffic.simulate: false`), counts what arrived. With
`promotion.mode: canary` the new version goes live as challenger and the canary stage waits for live
evidence (the simulated users graded by the feedback oracle, or real users' feedback and the judge)
until the promotion controller decides.
A stage whose `result.json` exists is not run again, so a crashed cycle resumes at the first stage
without an output, and registration looks the adapter digest up first: never two versions of one
checkpoint. Printing is the driver's business; this returns a CycleReport.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict

from loop.config import EndpointConfig, LoopConfig
from loop.cycle.data import DataStages
from loop.cycle.learn import LearnStages
from loop.cycle.release import ReleaseStages
from loop.cycle.report import CycleFailed, CycleReport
from loop.cluster import Services
from loop.cycle.stages import fault_point, manifest, output_digest, write_json

__all__ = ["Cycle", "CycleFailed", "CycleReport"]


class Cycle(DataStages, LearnStages, ReleaseStages):
    def __init__(self, cfg: LoopConfig, services: Services, endpoint: EndpointConfig, number: int,
                 api_key: str, progress=print):
        self.cfg, self.services, self.endpoint, self.number = cfg, services, endpoint, number
        self.api_key, self.progress = api_key, progress
        self.dir = cfg.storage.path("cycles", endpoint.id, f"cycle-{number:04d}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.epoch = number
        self.report = CycleReport(endpoint.id, number, self.epoch)
        self.lineage = services.lineage
        self._redo = False
        # The demo's simulated users (services.world, loaded by import path); a real-traffic cycle has none.
        self.world = services.world
        self.users = self.world.users(services, endpoint, number, api_key, progress) if self.world else None
        self.simulate = self.users is not None

    # --- stage bookkeeping ------------------------------------------------------------------
    def stage(self, name: str, fn):
        """Run `fn(stage_dir, mlflow_run_id)` unless the stage already finished and its outputs are as
        it left them (the manifest of digests in its result.json); record its time and MLflow child run.
        A finished stage whose outputs changed runs again, and so does every stage after it."""
        sdir = self.dir / name
        done = sdir / "result.json"
        if done.exists() and not self._redo:
            result = json.loads(done.read_text())
            changed = [k for k, v in result.get("_manifest", {}).items() if output_digest(sdir / k) != v]
            if not changed:
                self.progress(f"  [{name}] done in an earlier run, skipped")
                self.report.stage_seconds[name] = result.get("_seconds", 0.0)
                return result
            self.progress(f"  [{name}] outputs {changed} differ from its manifest: running it and every later stage again")
            self._redo = True
        sdir.mkdir(parents=True, exist_ok=True)
        self.progress(f"  [{name}] ...")
        started, started_at = time.perf_counter(), time.time()
        child = self.lineage.start_run(f"{name}", parent_run_id=self.report.run_id,
                                       tags={"loop.stage": name, "loop.endpoint": self.endpoint.id})
        fault_point(self.endpoint.id, name, "before")
        try:
            result = fn(sdir, child)
        except BaseException:
            self.lineage.end_run(child, ok=False)
            raise
        seconds = time.perf_counter() - started
        result.update(_seconds=seconds, _started_at=started_at, _ended_at=time.time(), _manifest=manifest(sdir))
        self.lineage.log(child, metrics={"seconds": seconds})
        self.lineage.end_run(child)
        fault_point(self.endpoint.id, name, "after")
        write_json(done, result)
        self.report.stage_seconds[name] = seconds
        self.progress(f"  [{name}] {seconds:.1f} s")
        return result

    # --- the cycle --------------------------------------------------------------------------
    def run(self) -> CycleReport:
        run_file = self.dir / "run.json"
        if run_file.exists():
            self.report.run_id = json.loads(run_file.read_text())["run_id"]
        else:
            self.report.run_id = self.lineage.start_run(
                f"{self.endpoint.id}-cycle-{self.number}",
                tags={"loop.endpoint": self.endpoint.id, "loop.cycle": str(self.number)})
            write_json(run_file, {"run_id": self.report.run_id})
        ok = False
        try:
            if self.world:
                self.world.before_cycle(self.epoch)
            traffic = self.stage("traffic", self._traffic if self.simulate else self._observe)
            self.report.student_acc_before = traffic["eval_acc"]
            self.report.teacher_acc = traffic["teacher_acc"]
            self.report.served_before = traffic["served_by"]
            data = self.stage("label", self._select_and_label)
            train = self.stage("train", lambda d, r: self._train(d, r, data))
            merge = self.stage("merge", lambda d, r: self._merge(d, r, train))
            if merge["passed"]:
                # The draft is co-trained first, so the gate can check it as part of the version.
                draft = self.stage("draft", lambda d, r: self._draft(d, r, data, train, merge))
                val = self.stage("validate", lambda d, r: self._validate(d, r, data, train, merge, draft))
            else:
                val = {"passed": False, "reasons": [f"merge proofs failed: {'; '.join(merge['reasons'])}"]}
            self.report.validation_passed = val["passed"]
            self.report.suites = {k: {f: v[f] for f in ("kind", "num_items", "candidate", "champion", "base", "passed")}
                                  for k, v in val.get("suites", {}).items()}
            self.report.teacher_agreement = val.get("teacher_agreement", float("nan"))
            self.report.teacher_cost_usd = data.get("teacher_cost_usd", 0.0) + val.get("judge", {}).get("cost_usd", 0.0)
            if val["passed"]:
                reg = self.stage("register", lambda d, r: self._register(d, r, data, train, merge, val, draft))
                self.report.new_version = reg["version"]
                self.stage("deploy", lambda d, r: self._deploy(d, r, reg))
                if self.cfg.promotion.mode == "canary":
                    canary = self.stage("canary", lambda d, r: self._canary(d, r, reg))
                    self.report.promotion = canary["decision"]
                    if canary["decision"] != "promote":
                        self.report.notes.append(f"canary {canary['decision']}: {'; '.join(canary['reasons'])}")
                    self._stage_clock(train, canary)
            else:
                self.report.notes += val["reasons"]
            after = self.stage("evaluate", self._evaluate)
            self.report.student_acc_after = after["eval_acc"]
            self.report.served_after = after["served_by"]
            self.report.static_acc = after.get("static_acc", float("nan"))
            self.report.regression_acc = after.get("regression_acc", float("nan"))
            self.report.base_regression_acc = after.get("static_regression_acc", float("nan"))
            ok = True
        finally:
            self.lineage.log(self.report.run_id, metrics={
                "student_acc_before": self.report.student_acc_before,
                "student_acc_after": self.report.student_acc_after, "teacher_acc": self.report.teacher_acc,
                **{k: v for k in ("static_acc", "regression_acc", "base_regression_acc")
                   if (v := getattr(self.report, k)) == v},
                **{f"stage_seconds.{k}": v for k, v in self.report.stage_seconds.items()}})
            self.lineage.end_run(self.report.run_id, ok=ok)
        write_json(self.dir / "report.json", asdict(self.report))
        return self.report
