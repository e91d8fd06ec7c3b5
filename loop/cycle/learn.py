"""The cycle's learning stages: LoRA distillation, the architecture-aware merge and its proofs, the
draft's co-training, and the validation gate."""
from __future__ import annotations

import json
from pathlib import Path

from loop.cycle.report import CycleFailed
from loop.models.digest import dir_digest
from loop.cycle.stages import write_json
from loop.teacher.calls import teacher_dir


class LearnStages:
    """Stages of `Cycle` (loop.cycle) that make and check the new version; they use its cfg, services,
    endpoint, dir and report."""

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

        from loop.validate.gate import Validator, configured_suites, uses_judge

        champion = self.lineage.version_info(self.endpoint.id, "champion")
        suites, refused = configured_suites(self.cfg.validation, self.cfg.storage.path(), self.number)
        heldout = [json.loads(line) for line in (Path(data["dataset"]).parent / "heldout.jsonl").read_text()
                   .splitlines() if line.strip()]
        judge = self._judge() if uses_judge(suites) else None
        actor = ray.remote(num_cpus=1)(Validator).remote(self.cfg.validation, self.cfg.storage.path("suites"), judge)
        try:
            report = ray.get(actor.run.remote(Path(merge["merged_dir"]), self.cfg.model_path(self.cfg.student),
                                              champion["adapter_path"], suites, heldout, draft["draft_path"],
                                              draft.get("acceptance"), refused, train["adapter_digest"],
                                              champion.get("adapter_digest") or None))
        finally:
            ray.kill(actor)
        n = self.cfg.validation.parity_questions
        if n and report.passed:  # engines only for a candidate worth serving
            from loop.validate.parity import serving_parity

            report.parity, reasons = serving_parity(
                self.cfg, merge["merged_dir"], train["adapter_dir"], draft["draft_path"],
                report.reference_questions, report.reference_answers, self.cfg.validation.max_new_tokens)
            self._record_engine_proof(merge, report.parity)
            report.reasons += reasons
            report.passed = not report.reasons
        self.lineage.log_dict(run_id, report.to_dict(), "validation_report.json")
        per_suite = {f"suite.{name}.{who}": s[who] for name, s in report.suites.items()
                     for who in ("candidate", "champion", "base") if s.get(who) is not None}
        self.lineage.log(run_id, metrics={**per_suite, **{k: v for k, v in report.to_dict().items()
                                                         if isinstance(v, float) and v == v},
                                          **{f"judge.{k}": v for k, v in report.judge.items()}},
                         tags={"verdict": "pass" if report.passed else "fail"})
        return report.to_dict()

    def _judge(self, judge=None, what: str = "a suite grades with 'judge'"):
        """The teacher as a judge (`judge`: its JudgeConfig, default validation.judge); HTTP teachers
        only (a local teacher has no endpoint)."""
        from loop.teacher.client import teacher_key
        from loop.teacher.judge import TeacherJudge

        if self.cfg.teacher.kind == "local":
            raise CycleFailed(f"{what}, which needs an HTTP teacher (teacher.kind openai); "
                              "use another grader with a local teacher")
        return TeacherJudge(self.cfg.teacher, self.services.teacher_url, teacher_key(self.cfg.teacher),
                            judge or self.cfg.validation.judge, str(self.cfg.storage.path("teacher-cache.sqlite")))

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
        questions = (self.users.heldout_questions() if self.simulate else [
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
