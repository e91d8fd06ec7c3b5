"""One generation of the loop for one endpoint, stage by stage, each stage's output on disk.

traffic -> label -> train -> merge -> draft -> validate -> register -> deploy -> canary -> evaluate
(`label` selects the served prompts that matter, then has the teacher label them). `traffic` sends the
demo's simulated users, or, on real traffic (`traffic.simulate: false`), counts what arrived. With
`promotion.mode: canary` the new version goes live as challenger and the canary stage waits for live
evidence (the simulated users graded by the feedback oracle, or real users' feedback and the judge)
until the promotion controller decides.
Each stage is a plain function of the cycle's context (loop/cycle/context.py) in `data`, `learn` or
`release`, handing the next stages a typed result (loop/cycle/results.py) that is also its result.json.
A stage whose `result.json` exists is not run again, so a crashed cycle resumes at the first stage
without an output, and registration looks the adapter digest up first: never two versions of one
checkpoint. Printing is the driver's business; this returns a CycleReport.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict

from loop.cluster import Services
from loop.config import EndpointConfig, LoopConfig
from loop.cycle import data, learn, release
from loop.cycle.context import CycleContext
from loop.cycle.report import CycleFailed, CycleReport
from loop.cycle.results import (CanaryResult, DeployResult, DraftResult, EvaluateResult, LabelResult, MergeResult,
                                RegisterResult, StageRecord, TrafficResult, TrainResult, ValidationResult, from_json,
                                to_json)
from loop.cycle.stages import fault_point, manifest, output_digest, write_json

__all__ = ["Cycle", "CycleFailed", "CycleReport"]


class Cycle:
    def __init__(self, cfg: LoopConfig, services: Services, endpoint: EndpointConfig, number: int,
                 api_key: str, progress=print):
        cycle_dir = cfg.storage.path("cycles", endpoint.id, f"cycle-{number:04d}")
        cycle_dir.mkdir(parents=True, exist_ok=True)
        # The demo's simulated users (services.world, loaded by import path); a real-traffic cycle has none.
        self.world = services.world
        users = self.world.users(services, endpoint, number, api_key, progress) if self.world else None
        self.ctx = CycleContext(cfg, services, endpoint, number, cycle_dir, CycleReport(endpoint.id, number, number),
                                users, progress)
        self.report, self.lineage = self.ctx.report, self.ctx.lineage
        self._redo = False

    # --- stage bookkeeping ------------------------------------------------------------------
    def stage(self, name: str, kind, fn):
        """The `kind` result of `fn(context, stage_dir, mlflow_run_id)`, unless the stage already
        finished and its outputs are as it left them (the manifest of digests in its result.json):
        then the result it wrote. Records its time and MLflow child run. A finished stage whose outputs
        changed runs again, and so does every stage after it."""
        ctx = self.ctx
        sdir = ctx.dir / name
        done = sdir / "result.json"
        if done.exists() and not self._redo:
            try:
                result = from_json(kind, json.loads(done.read_text()))
                record = result.record or StageRecord()
                changed = [k for k, v in record.manifest.items() if output_digest(sdir / k) != v]
            except (TypeError, ValueError) as e:  # not a result this stage writes: run it again
                result, changed = None, [f"result.json ({e})"]
            if not changed:
                ctx.progress(f"  [{name}] done in an earlier run, skipped")
                self.report.stage_seconds[name] = record.seconds
                return result
            ctx.progress(f"  [{name}] outputs {changed} differ from its manifest: running it and every later stage again")
            self._redo = True
        sdir.mkdir(parents=True, exist_ok=True)
        ctx.progress(f"  [{name}] ...")
        started, started_at = time.perf_counter(), time.time()
        child = self.lineage.start_run(f"{name}", parent_run_id=self.report.run_id,
                                       tags={"loop.stage": name, "loop.endpoint": ctx.endpoint.id})
        fault_point(ctx.endpoint.id, name, "before")
        try:
            result = fn(ctx, sdir, child)
        except BaseException:
            self.lineage.end_run(child, ok=False)
            raise
        seconds = time.perf_counter() - started
        result.record = StageRecord(seconds, started_at, time.time(), manifest(sdir))
        self.lineage.log(child, metrics={"seconds": seconds})
        self.lineage.end_run(child)
        fault_point(ctx.endpoint.id, name, "after")
        write_json(done, to_json(result))
        self.report.stage_seconds[name] = seconds
        ctx.progress(f"  [{name}] {seconds:.1f} s")
        return result

    # --- the cycle --------------------------------------------------------------------------
    def run(self) -> CycleReport:
        ctx, rep = self.ctx, self.report
        run_file = ctx.dir / "run.json"
        if run_file.exists():
            rep.run_id = json.loads(run_file.read_text())["run_id"]
        else:
            rep.run_id = self.lineage.start_run(
                f"{ctx.endpoint.id}-cycle-{ctx.number}",
                tags={"loop.endpoint": ctx.endpoint.id, "loop.cycle": str(ctx.number)})
            write_json(run_file, {"run_id": rep.run_id})
        ok = False
        try:
            if self.world:
                self.world.before_cycle(ctx.epoch)
            traffic: TrafficResult = self.stage("traffic", TrafficResult, data.traffic if ctx.simulate else data.observe)
            rep.student_acc_before, rep.teacher_acc, rep.served_before = \
                traffic.eval_acc, traffic.teacher_acc, traffic.served_by
            label: LabelResult = self.stage("label", LabelResult, data.select_and_label)
            trained: TrainResult = self.stage("train", TrainResult, lambda c, d, r: learn.train(c, d, r, label))
            merged: MergeResult = self.stage("merge", MergeResult, lambda c, d, r: learn.merge(c, d, r, trained))
            if merged.passed:
                # The draft is co-trained first, so the gate can check it as part of the version.
                drafted: DraftResult = self.stage("draft", DraftResult,
                                                  lambda c, d, r: learn.draft(c, d, r, label, trained, merged))
                val: ValidationResult = self.stage(
                    "validate", ValidationResult, lambda c, d, r: learn.validate(c, d, r, label, trained, merged, drafted))
            else:
                val = ValidationResult(passed=False, reasons=[f"merge proofs failed: {'; '.join(merged.reasons)}"])
            rep.validation_passed = val.passed
            rep.suites = {k: {f: v[f] for f in ("kind", "num_items", "candidate", "champion", "base", "passed")}
                          for k, v in val.suites.items()}
            rep.teacher_agreement = val.teacher_agreement
            rep.teacher_cost_usd = label.teacher_cost_usd + val.judge.get("cost_usd", 0.0)
            if val.passed:
                reg: RegisterResult = self.stage(
                    "register", RegisterResult, lambda c, d, r: release.register(c, d, r, label, trained, merged, val,
                                                                                 drafted))
                rep.new_version = reg.version
                self.stage("deploy", DeployResult, lambda c, d, r: release.deploy(c, d, r, reg))
                if ctx.cfg.promotion.mode == "canary":
                    canaried: CanaryResult = self.stage("canary", CanaryResult,
                                                        lambda c, d, r: release.canary(c, d, r, reg))
                    rep.promotion = canaried.decision
                    if canaried.decision != "promote":
                        rep.notes.append(f"canary {canaried.decision}: {'; '.join(canaried.reasons)}")
                    release.record_stage_clock(ctx, trained, canaried)
            else:
                rep.notes += val.reasons
            after: EvaluateResult = self.stage("evaluate", EvaluateResult, data.evaluate)
            rep.student_acc_after, rep.served_after = after.eval_acc, after.served_by
            rep.static_acc, rep.regression_acc = after.static_acc, after.regression_acc
            rep.base_regression_acc = after.static_regression_acc
            ok = True
        finally:
            self.lineage.log(rep.run_id, metrics={
                "student_acc_before": rep.student_acc_before,
                "student_acc_after": rep.student_acc_after, "teacher_acc": rep.teacher_acc,
                **{k: v for k in ("static_acc", "regression_acc", "base_regression_acc")
                   if (v := getattr(rep, k)) == v},
                **{f"stage_seconds.{k}": v for k, v in rep.stage_seconds.items()}})
            self.lineage.end_run(rep.run_id, ok=ok)
        write_json(ctx.dir / "report.json", asdict(rep))
        return rep
