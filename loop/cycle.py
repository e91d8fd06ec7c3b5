"""One generation of the loop for one endpoint, stage by stage, each stage's output on disk.

traffic -> select -> label -> train -> merge -> draft -> validate -> register -> deploy -> canary -> evaluate.
With `promotion.mode: canary` the new version goes live as challenger and the canary stage sends
simulated users (graded by the feedback oracle) until the promotion controller decides.
A stage whose `result.json` exists is not run again, so a crashed cycle resumes at the first stage
without an output, and registration looks the adapter digest up first: never two versions of one
checkpoint. Printing is the driver's business; this returns a CycleReport.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loop.config import EndpointConfig, LoopConfig
from loop.control.canary import stage_clock
from loop.data.label import escalation_labels, previous_cutoff, replay_sources, write_failures, write_replay, write_split
from loop.data.select import rated_good, select_prompts
from loop.models.digest import dir_digest
from loop.services import Services, admin, set_teacher_epoch
from loop.sim.traffic import EVAL_USER
from loop.sim.users import SimulatedUsers
from loop.sim.world import World
from loop.stages import fault_point, manifest, output_digest, write_json
from loop.teacher.calls import teacher_dir
from loop.traces.log import read_feedback


class CycleFailed(RuntimeError):
    """A cycle stopped for a reason the user can act on; the message says which and how."""


@dataclass
class CycleReport:
    endpoint: str
    cycle: int
    epoch: int
    student_acc_before: float = 0.0
    """The champion at the cycle's start, on the held-out phrasings of the current (drifted) facts."""
    student_acc_after: float = 0.0
    """The champion at the cycle's end (the new version, if it was promoted), on the same questions."""
    teacher_acc: float = 0.0
    static_acc: float = float("nan")
    """The static snapshot (version 1, the base student, never updated) on the same questions."""
    regression_acc: float = float("nan")
    """The champion at the cycle's end on the general questions the base answers right."""
    base_regression_acc: float = float("nan")
    served_before: str = ""
    served_after: str = ""
    new_version: str | None = None
    validation_passed: bool = False
    run_id: str = ""
    promotion: str = ""
    """The promotion controller's verdict on the new version: promote, rollback, or continue
    (still collecting evidence when the canary stage ended)."""
    stage_seconds: dict = field(default_factory=dict)
    stage_clock: dict = field(default_factory=dict)
    """Checkpoint written (train stage done) -> first canary request served, and each stage's share."""
    notes: list[str] = field(default_factory=list)


class Cycle:
    def __init__(self, cfg: LoopConfig, services: Services, endpoint: EndpointConfig, number: int,
                 api_key: str, progress=print):
        self.cfg, self.services, self.endpoint, self.number = cfg, services, endpoint, number
        self.api_key, self.progress = api_key, progress
        self.dir = cfg.storage.path("cycles", endpoint.id, f"cycle-{number:04d}")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.epoch = number
        w = cfg.world
        self.world = World(w.seed, self.epoch, w.num_entities, w.drift_fraction, w.new_per_epoch)
        self.report = CycleReport(endpoint.id, number, self.epoch)
        self.lineage = services.lineage
        self._redo = False
        self.simulate = cfg.traffic.simulate
        self.users = SimulatedUsers(cfg, services, endpoint, self.world, number, api_key, progress)

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
            set_teacher_epoch(self.services, self.epoch)
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

    def _traffic(self, sdir: Path, run_id: str) -> dict:
        from loop.teacher.client import check_reachable

        if self.cfg.teacher.kind != "local":
            check_reachable(self.cfg.teacher, self.services.teacher_url)
        result = self.users.traffic()
        self.lineage.log(run_id, metrics={k: result[k] for k in ("requests", "user_acc", "eval_acc", "teacher_acc")})
        return result

    def _observe(self, sdir: Path, run_id: str) -> dict:
        """Real traffic (`traffic.simulate: false`): nothing is sent; how many requests arrived since the
        last cycle, and who served them. Accuracy is the gate's business (held-out teacher labels)."""
        from loop.traces.log import read_traces

        since = self._previous_cutoff()
        rows = [r for r in read_traces(self.cfg.storage.path("traces"))
                if r["endpoint"] == self.endpoint.id and r["ts"] > since and r["status"] == 200]
        nan = float("nan")
        result = {"requests": len(rows), "since": since, "eval_acc": nan, "teacher_acc": nan,
                  "served_by": ",".join(sorted({r["model_version"] for r in rows}))}
        self.lineage.log(run_id, metrics={"requests": len(rows)})
        return result

    def _select_and_label(self, sdir: Path, run_id: str) -> dict:
        import ray

        from loop.teacher.client import LabelsFailed, split_labels

        ray.get(self.services.trace_log.compact.remote())
        parts = self.cfg.storage.path("traces", "parquet")
        since = self._previous_cutoff()
        ds = ray.data.read_parquet(str(parts)).filter(
            expr=f"endpoint == '{self.endpoint.id}' and status == 200 and ts > {since}")
        read = ds.select_columns(["prompt", "user", "ts", "request_id", "escalated", "confidence", "completion",
                                  "model_version"]).take_all()
        # The next cycle starts after the newest record read here: nothing falls between cycles.
        cutoff = max((r["ts"] for r in read), default=since)
        # What the champion (the version this cycle improves on) answered: a retired version's mistakes,
        # or a rolled-back challenger's, are not evidence about it.
        champion = self.lineage.version_info(self.endpoint.id, "champion")["version"]
        rows = [r for r in read if not r["user"].startswith(EVAL_USER) and r["model_version"] == champion]
        d = self.cfg.data
        feedback = read_feedback(self.cfg.storage.path("traces"))
        sel = select_prompts(rows, feedback, max_prompts=d.max_prompts,
                             sample_size=d.sample_size, min_confidence=d.min_confidence,
                             negative_score=d.negative_score, heldout_fraction=d.heldout_fraction, seed=self.number)
        prompts, heldout = [r["prompt"] for r in sel.train], {r["prompt"] for r in sel.heldout}
        if not prompts:
            raise CycleFailed(f"no new traffic answered by model-{self.endpoint.id}'s champion ({champion}) since the "
                              "last cycle: nothing to learn")
        labeled = self._label(rows, prompts + sorted(heldout))
        try:
            good, failed = split_labels(labeled, self.cfg.data.max_failed_fraction)
        except LabelsFailed as e:
            write_failures(sdir / "label_failures.jsonl", e.failed)
            raise CycleFailed(f"{e} (which, and why: {sdir / 'label_failures.jsonl'})") from None
        write_failures(sdir / "label_failures.jsonl", failed)
        cost = {"teacher_cost_usd": sum(r["cost_usd"] for r in labeled),
                "from_escalation": sum(bool(r.get("from_escalation")) for r in labeled),
                "teacher_cached": sum(bool(r["cached"]) for r in labeled),
                "teacher_tokens": sum(r["prompt_tokens"] + r["completion_tokens"] for r in labeled),
                "teacher_prompt_tokens": sum(r["prompt_tokens"] for r in labeled if not r["cached"]),
                "teacher_completion_tokens": sum(r["completion_tokens"] for r in labeled if not r["cached"])}
        trained = [r for r in good if r["messages"] not in heldout]
        if not trained:
            raise CycleFailed(f"the teacher labelled none of the {len(prompts)} training prompts "
                              f"(first error: {failed[0]['label_error'] if failed else 'none'}); check teacher.base_url")
        kept = rated_good(rows, feedback, {r["prompt"] for r in sel.train} | heldout, d.keep_rated,
                          self.cfg.promotion.positive_score, seed=self.number)
        path = write_split(sdir, good, heldout, kept)
        replayed = write_replay(self.dir.parent, self.number, sdir / "replay.jsonl",
                                round(self.cfg.training.replay_ratio * len(trained)))
        digest = dir_digest(sdir)
        cost.update(replayed=replayed, kept=len(kept), **{f"selected_{k}": v for k, v in sel.counts.items()})
        self.lineage.log(run_id, params={"dataset_digest": digest, "since": since},
                         metrics={"selected": len(prompts), "labelled": len(good), "label_failed": len(failed), **cost})
        return {"dataset": str(path), "dataset_digest": digest, "selected": len(prompts), "labelled": len(good),
                "kept": len(kept),
                "label_failed": len(failed), "cutoff": cutoff, "replay": str(sdir / "replay.jsonl"), **cost}

    def _label(self, rows: list[dict], prompts: list[str]) -> list[dict]:
        """The teacher's labels for `prompts`; those the cascade escalated reuse the answer it paid for."""
        from loop.teacher.calls import label

        asked, reused = escalation_labels(rows, prompts)
        return (label(self.cfg, self.services.teacher_url, self.epoch, asked) if asked else []) + reused

    def _previous_cutoff(self) -> float:
        return previous_cutoff(self.dir.parent, self.number)

    def _train(self, sdir: Path, run_id: str, data: dict) -> dict:
        from loop.train.sft import CheckpointNotWritten, LoRADistiller, TrainingDiverged

        champion = self.lineage.version_info(self.endpoint.id, "champion")
        distiller = LoRADistiller(self.cfg.training, self.cfg.storage.path("ray_train"),
                                  f"{self.endpoint.id}-cycle-{self.number:04d}")
        try:
            metrics = distiller.run(self.cfg.model_path(self.cfg.student), Path(data["dataset"]), sdir / "adapter",
                                    init_adapter=champion["adapter_path"],
                                    replay=Path(data["replay"]) if data.get("replay") else None,
                                    teacher_dir=teacher_dir(self.cfg), teacher_gpus=self.cfg.teacher.num_gpus)
        except (TrainingDiverged, CheckpointNotWritten) as e:
            raise CycleFailed(f"{e}; nothing was registered or deployed") from None
        digest = dir_digest(sdir / "adapter")
        self.lineage.log(run_id, params={**self.cfg.training.model_dump(), "warm_start": champion["version"]},
                         metrics={k: v for k, v in metrics.items() if isinstance(v, (int, float))},
                         tags={"adapter_digest": digest})
        return {"adapter_dir": str(sdir / "adapter"), "adapter_digest": digest, "parent": champion,
                "metrics": {k: v for k, v in metrics.items() if isinstance(v, (int, float))}, "run_id": run_id}

    def _merge(self, sdir: Path, run_id: str, train: dict) -> dict:
        import ray

        from loop.merge.merger import MergeFailed, Merger

        actor = ray.remote(num_cpus=1)(Merger).remote(self.cfg.merge)
        try:
            report = ray.get(actor.run.remote(self.cfg.model_path(self.cfg.student), Path(train["adapter_dir"]),
                                              sdir / "merged"))
        except ray.exceptions.RayTaskError as e:
            if not isinstance(e.cause, MergeFailed):
                raise
            # A failed proof is a verdict, not a crash: recorded, nothing registered or deployed.
            failed = json.loads((sdir / "merge_report.json").read_text())
            self.lineage.log_dict(run_id, failed, "merge_report.json")
            self.lineage.log(run_id, tags={"verdict": "fail"})
            return failed
        finally:
            ray.kill(actor)
        report.engine_note = "deferred to the validate stage's serving parity (one engine start, with the draft)"
        (sdir / "merge_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        self.lineage.log_dict(run_id, report.to_dict(), "merge_report.json")
        self.lineage.log(run_id, metrics={"max_abs_logit_diff": report.max_abs_logit_diff,
                                          "merged_to_base": report.merged_to_base})
        return {**report.to_dict(), "run_id": run_id}

    def _record_engine_proof(self, merge: dict, parity: dict) -> None:
        """Proof 4 of the merge, as the validate stage's serving parity ran it: into the MergeReport
        on disk and in MLflow."""
        path = Path(merge["merged_dir"]).parent / "merge_report.json"
        report = json.loads(path.read_text())
        if "merged_identical" in parity:
            report.update(engine_identical=parity["merged_identical"],
                          engine_note="checked by the validate stage: vLLM on the merged directory, with the draft")
        else:
            report.update(engine_note="not run: no endpoint serves merged weights (validation.merged_parity: auto); "
                                      "the adapter's serving parity was checked on the multi-LoRA engine")
        write_json(path, report)
        self.lineage.log_dict(merge["run_id"], report, "merge_report.json")

    def _validate(self, sdir: Path, run_id: str, data: dict, train: dict, merge: dict, draft: dict) -> dict:
        import ray

        from loop.validate.gate import Validator

        champion = self.lineage.version_info(self.endpoint.id, "champion")
        actor = ray.remote(num_cpus=1)(Validator).remote(self.cfg.validation)
        try:
            facts = self.world.facts if self.simulate else []
            earlier = {f.entity for f in facts if f.entity not in self.world.changed}
            heldout = [json.loads(line) for line in (Path(data["dataset"]).parent / "heldout.jsonl").read_text()
                       .splitlines() if line.strip()]
            report = ray.get(actor.run.remote(Path(merge["merged_dir"]), self.cfg.model_path(self.cfg.student),
                                              champion["adapter_path"], facts, earlier, heldout,
                                              draft["draft_path"], draft.get("acceptance")))
        finally:
            ray.kill(actor)
        n = self.cfg.validation.parity_questions
        if n and report.passed:  # engines only for a candidate worth serving
            from loop.validate.parity import serving_parity

            report.parity, reasons = serving_parity(
                self.cfg, merge["merged_dir"], train["adapter_dir"],
                draft["draft_path"], [[{"role": "user", "content": q}] if isinstance(q, str) else q
                                      for q in report.reference_questions],
                report.reference_answers, self.cfg.validation.max_new_tokens)
            self._record_engine_proof(merge, report.parity)
            report.reasons += reasons
            report.passed = not report.reasons
        self.lineage.log_dict(run_id, report.to_dict(), "validation_report.json")
        self.lineage.log(run_id, metrics={k: v for k, v in report.to_dict().items() if isinstance(v, float) and v == v},
                         tags={"verdict": "pass" if report.passed else "fail"})
        return report.to_dict()

    def _draft(self, sdir: Path, run_id: str, data: dict, train: dict, merge: dict) -> dict:
        """Co-train the draft on the new student (merged weights); keep whichever draft the new
        student accepts more of: the parent version's, or the co-trained one."""
        import ray

        from loop.train.draft import DraftDistiller, measure_acceptance

        dc = self.cfg.draft_training
        parent = train["parent"].get("draft_path") or str(self.cfg.model_path(self.cfg.draft))
        result = {"draft_path": parent, "draft_digest": dir_digest(parent), "cotrained": False}
        if not dc.enabled:
            return result
        questions = ([f.heldout_question() for f in self.world.facts] if self.simulate else [
            json.loads(line)["messages"][-1]["content"]
            for line in Path(data["dataset"]).read_text().splitlines() if line.strip()])[:dc.acceptance_questions]
        measure = ray.remote(num_cpus=1)(measure_acceptance)
        threads = self.cfg.training.torch_threads or 2
        stale = ray.get(measure.remote(merge["merged_dir"], parent, questions, dc.num_speculative_tokens,
                                       max_new_tokens=dc.max_new_tokens, threads=threads))
        metrics = DraftDistiller(dc, self.cfg.storage.path("ray_train"), f"{self.endpoint.id}-cycle-{self.number:04d}-draft"
                                 ).run(Path(merge["merged_dir"]), Path(parent), Path(data["dataset"]), sdir / "draft",
                                       replay=Path(data["replay"]) if data.get("replay") else None)
        cotrained = ray.get(measure.remote(merge["merged_dir"], str(sdir / "draft"), questions,
                                           dc.num_speculative_tokens, max_new_tokens=dc.max_new_tokens,
                                           threads=threads))
        result.update(acceptance_stale=stale, acceptance_cotrained=cotrained, k=dc.num_speculative_tokens,
                      **{k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        result["acceptance"] = max(stale, cotrained)
        if cotrained >= stale:
            result.update(draft_path=str(sdir / "draft"), draft_digest=dir_digest(sdir / "draft"), cotrained=True)
        self.lineage.log(run_id, metrics={k: v for k, v in result.items() if isinstance(v, (int, float))
                                          and not isinstance(v, bool)}, tags={"draft_digest": result["draft_digest"]})
        return result

    def _register(self, sdir: Path, run_id: str, data: dict, train: dict, merge: dict, val: dict,
                  draft: dict) -> dict:
        existing = self.lineage.find_version(self.endpoint.id, "adapter_digest", train["adapter_digest"])
        if existing:
            return existing
        artifact = self.lineage.log_artifacts(train["run_id"], train["adapter_dir"], "adapter")
        info = self.lineage.register_version(self.endpoint.id, train["run_id"], "adapter", {
            "parent_version": train["parent"]["version"], "training_run_id": train["run_id"],
            "cycle_run_id": self.report.run_id, "dataset_digest": data["dataset_digest"],
            "base_digest": self.services.base_manifest["digest"], "adapter_digest": train["adapter_digest"],
            "checkpoint_digest": train["adapter_digest"], "merged_digest": merge["merged_digest"],
            "draft_digest": draft["draft_digest"], "merged_path": merge["merged_dir"], "draft_path": draft["draft_path"],
            "validation_verdict": "pass", "candidate_acc": val["candidate_acc"], "champion_acc": val["champion_acc"],
            "replay_sources": replay_sources(self.dir.parent, self.number) if data.get("replayed") else "", "artifact": artifact})
        self.lineage.log(run_id, tags={"registered_version": info["version"]})
        return info

    def _deploy(self, sdir: Path, run_id: str, reg: dict) -> dict:
        import ray

        started = time.perf_counter()
        canary = self.cfg.promotion.mode == "canary"
        role = "challenger" if canary else "champion"
        rollout = ray.get(self.services.controller.live.remote())[self.endpoint.id]
        held = [r for r in ("champion", "challenger") if (rollout[r] or {}).get("number") == reg["number"]]
        if held:  # a resumed cycle whose deploy went through before the crash: never deployed twice
            role = held[0]
        else:
            # The same path as `POST /admin/deploy`: aliases first, then every replica.
            rollout = admin(self.services, "deploy", self.endpoint.id, version=reg["number"], role=role, by="cycle",
                            **({"weight": self.cfg.rollout.challenger_weight} if canary else {}))
        seconds = time.perf_counter() - started
        self.lineage.log(run_id, metrics={"reconcile_seconds": seconds}, tags={role: reg["version"]})
        return {role: rollout[role], "role": role, "deployed_at": rollout[role]["deployed_at"],
                "challenger_weight": rollout["challenger_weight"], "reconcile_seconds": seconds}

    def _canary(self, sdir: Path, run_id: str, reg: dict) -> dict:
        """Live evidence on the new version until the promotion controller promotes it or rolls it back."""
        from loop.control.canary import first_served, settled_verdict
        from loop.control.controller import PromotionController

        traces = self.cfg.storage.path("traces")
        settled = settled_verdict(self.lineage, self.endpoint.id, reg, traces)
        if settled:  # decided before a crash: the verdict stands, nothing is sent or decided again
            return settled
        controller = PromotionController(self.services)
        decision, rounds, sent = (self.users.canary if self.simulate else self._live_canary)(controller)
        first = first_served(traces, self.endpoint.id, reg["version"])
        result = {"decision": decision.action, "reasons": decision.reasons, "p_better": decision.p_better,
                  "rounds": rounds, "requests": sent, "champion": decision.champion,
                  "challenger": decision.challenger, "first_canary_request_ts": first}
        self.lineage.log(run_id, metrics={"rounds": rounds, "requests": sent,
                                          "p_better": decision.p_better if decision.p_better == decision.p_better else None},
                         tags={"decision": decision.action})
        return result

    def _live_canary(self, controller) -> tuple:
        """Real users: a decision every `promotion.check_interval_s` until `canary_wait_s`; an undecided
        challenger stays live and `loopctl run --forever` goes on deciding."""
        deadline, checks = time.time() + self.cfg.promotion.canary_wait_s, 0
        while True:
            checks += 1
            decision = controller.step(self.endpoint.id)
            self.progress(f"  [canary] check {checks}: {decision.action}: {decision.reasons[-1]}")
            if decision.action != "continue" or time.time() >= deadline:
                return decision, checks, 0
            time.sleep(self.cfg.promotion.check_interval_s)

    def _stage_clock(self, train: dict, canary: dict) -> None:
        clock = stage_clock(self.report.stage_seconds, train, canary)
        if clock:
            self.report.stage_clock = clock
            self.lineage.log(self.report.run_id, metrics={f"stage_clock.{k}": v for k, v in clock.items()})

    def _evaluate(self, sdir: Path, run_id: str) -> dict:
        """The champion now and the static snapshot (version 1, the base) on the same questions."""
        if not self.simulate:
            live = [self.lineage.version_info(self.endpoint.id, a) for a in ("champion", "challenger")]
            return {"eval_acc": float("nan"), "served_by": ",".join(v["version"] for v in live if v)}
        earlier = self.dir.parent / f"cycle-{self.number - 1:04d}" / "evaluate" / "result.json"
        known = json.loads(earlier.read_text()).get("static_regression_acc") if earlier.exists() else None
        result = self.users.evaluate(self.lineage.version_info_number(self.endpoint.id, 1),
                                     known if known == known else None)
        self.lineage.log(run_id, metrics={k: v for k in ("eval_acc", "regression_acc", "static_acc",
                                                          "static_regression_acc") if (v := result[k]) == v},
                         tags={"served_by": result["served_by"]})
        return result
