"""The cycle's learning stages: LoRA distillation, the architecture-aware merge and its proofs, the
draft's co-training, and the validation gate. Each is a function of the cycle's context, its stage
directory and MLflow run, and the results it builds on (loop/cycle/results.py)."""
from __future__ import annotations

import json
from pathlib import Path

from loop.cycle.context import CycleContext
from loop.cycle.report import CycleFailed
from loop.cycle.results import DraftResult, LabelResult, MergeResult, TrainResult, ValidationResult, from_json
from loop.models.digest import dir_digest
from loop.teacher.calls import teacher_dir


def train(ctx: CycleContext, sdir: Path, run_id: str, data: LabelResult) -> TrainResult:
    from loop.train.sft import CheckpointNotWritten, LoRADistiller, TrainingDiverged

    cfg = ctx.cfg
    champion = ctx.lineage.version_info(ctx.endpoint.id, "champion")
    distiller = LoRADistiller(cfg.training, cfg.storage.path("ray_train"), f"{ctx.endpoint.id}-cycle-{ctx.number:04d}")
    try:
        metrics = distiller.run(cfg.model_path(cfg.student), Path(data.dataset), sdir / "adapter",
                                init_adapter=champion["adapter_path"],
                                replay=Path(data.replay) if data.replay else None,
                                teacher_dir=teacher_dir(cfg), teacher_gpus=cfg.teacher.num_gpus)
    except (TrainingDiverged, CheckpointNotWritten) as e:
        raise CycleFailed(f"{e}; nothing was registered or deployed") from None
    digest = dir_digest(sdir / "adapter")
    numbers = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
    ctx.lineage.log(run_id, params={**cfg.training.model_dump(), "warm_start": champion["version"]},
                    metrics=numbers, tags={"adapter_digest": digest})
    return TrainResult(adapter_dir=str(sdir / "adapter"), adapter_digest=digest, parent=champion, run_id=run_id,
                       metrics=numbers)


def merge(ctx: CycleContext, sdir: Path, run_id: str, trained: TrainResult) -> MergeResult:
    import ray

    from loop.merge.merger import MergeFailed, Merger

    actor = ray.remote(num_cpus=1)(Merger).remote(ctx.cfg.merge)
    try:
        report = ray.get(actor.run.remote(ctx.cfg.model_path(ctx.cfg.student), Path(trained.adapter_dir),
                                          sdir / "merged"))
    except ray.exceptions.RayTaskError as e:
        if not isinstance(e.cause, MergeFailed):
            raise
        # A failed proof is a verdict, not a crash: recorded, nothing registered or deployed.
        failed = json.loads((sdir / "merge_report.json").read_text())
        ctx.lineage.log_dict(run_id, failed, "merge_report.json")
        ctx.lineage.log(run_id, tags={"verdict": "fail"})
        return from_json(MergeResult, failed)
    finally:
        ray.kill(actor)
    # Proof 4 (the engine's answers on the merged weights) is the validate stage's serving parity:
    # one engine start, with the draft the version ships with (ValidationResult.parity).
    report.engine_note = ("not run here: where validation.merged_parity applies, the validate stage's serving "
                          "parity runs it (its parity.merged_identical; the version's engine_identical tag)")
    (sdir / "merge_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    ctx.lineage.log_dict(run_id, report.to_dict(), "merge_report.json")
    ctx.lineage.log(run_id, metrics={"max_abs_logit_diff": report.max_abs_logit_diff,
                                     "merged_to_base": report.merged_to_base})
    return from_json(MergeResult, {**report.to_dict(), "run_id": run_id})


def draft(ctx: CycleContext, sdir: Path, run_id: str, data: LabelResult, trained: TrainResult,
          merged: MergeResult) -> DraftResult:
    """Co-train the draft on the new student (merged weights); keep whichever draft the new
    student accepts more of: the parent version's, or the co-trained one."""
    import ray

    from loop.train.draft import DraftDistiller, measure_acceptance

    cfg, dc = ctx.cfg, ctx.cfg.draft_training
    parent = trained.parent.get("draft_path") or str(cfg.model_path(cfg.draft))
    if not dc.enabled:
        return DraftResult(draft_path=parent, draft_digest=dir_digest(parent))
    questions = (ctx.users.heldout_questions() if ctx.simulate else [
        json.loads(line)["messages"][-1]["content"]
        for line in Path(data.dataset).read_text().splitlines() if line.strip()])[:dc.acceptance_questions]
    measure = ray.remote(num_cpus=1)(measure_acceptance)
    threads = cfg.training.torch_threads or 2
    stale = ray.get(measure.remote(merged.merged_dir, parent, questions, dc.num_speculative_tokens,
                                   max_new_tokens=dc.max_new_tokens, threads=threads))
    metrics = DraftDistiller(dc, cfg.storage.path("ray_train"), f"{ctx.endpoint.id}-cycle-{ctx.number:04d}-draft"
                             ).run(Path(merged.merged_dir), Path(parent), Path(data.dataset), sdir / "draft",
                                   replay=Path(data.replay) if data.replay else None)
    cotrained = ray.get(measure.remote(merged.merged_dir, str(sdir / "draft"), questions,
                                       dc.num_speculative_tokens, max_new_tokens=dc.max_new_tokens, threads=threads))
    kept = str(sdir / "draft") if cotrained >= stale else parent
    result = DraftResult(draft_path=kept, draft_digest=dir_digest(kept), cotrained=cotrained >= stale,
                         acceptance=max(stale, cotrained), acceptance_stale=stale, acceptance_cotrained=cotrained,
                         k=dc.num_speculative_tokens,
                         extra={k: v for k, v in metrics.items() if isinstance(v, (int, float))})
    ctx.lineage.log(run_id, metrics={"acceptance": result.acceptance, "acceptance_stale": stale,
                                     "acceptance_cotrained": cotrained, "k": dc.num_speculative_tokens, **{
        k: v for k, v in result.extra.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}},
                    tags={"draft_digest": result.draft_digest})
    return result


def validate(ctx: CycleContext, sdir: Path, run_id: str, data: LabelResult, trained: TrainResult,
             merged: MergeResult, drafted: DraftResult) -> ValidationResult:
    import ray

    from loop.validate.gate import Validator, configured_suites, uses_judge

    cfg = ctx.cfg
    champion = ctx.lineage.version_info(ctx.endpoint.id, "champion")
    suites, refused = configured_suites(cfg.validation, cfg.storage.path(), ctx.number)
    heldout = [json.loads(line) for line in data.heldout.read_text().splitlines() if line.strip()]
    judge = teacher_judge(ctx) if uses_judge(suites) else None
    actor = ray.remote(num_cpus=1)(Validator).remote(cfg.validation, cfg.storage.path("suites"), judge)
    try:
        report = ray.get(actor.run.remote(Path(merged.merged_dir), cfg.model_path(cfg.student),
                                          champion["adapter_path"], suites, heldout, drafted.draft_path,
                                          drafted.acceptance, refused, trained.adapter_digest,
                                          champion.get("adapter_digest") or None))
    finally:
        ray.kill(actor)
    n = cfg.validation.parity_questions
    if n and report.passed:  # engines only for a candidate worth serving
        from loop.validate.parity import serving_parity

        report.parity, reasons = serving_parity(
            cfg, merged.merged_dir, trained.adapter_dir, drafted.draft_path,
            report.reference_questions, report.reference_answers, cfg.validation.max_new_tokens)
        report.reasons += reasons
        report.passed = not report.reasons
    ctx.lineage.log_dict(run_id, report.to_dict(), "validation_report.json")
    per_suite = {f"suite.{name}.{who}": s[who] for name, s in report.suites.items()
                 for who in ("candidate", "champion", "base") if s.get(who) is not None}
    ctx.lineage.log(run_id, metrics={**per_suite, **{k: v for k, v in report.to_dict().items()
                                                    if isinstance(v, float) and v == v},
                                     **{f"judge.{k}": v for k, v in report.judge.items()}},
                    tags={"verdict": "pass" if report.passed else "fail",
                          **({"engine_identical": report.parity["merged_identical"]}
                             if "merged_identical" in report.parity else {})})
    return from_json(ValidationResult, report.to_dict())


def teacher_judge(ctx: CycleContext, judge=None, what: str = "a suite grades with 'judge'"):
    """The teacher as a judge (`judge`: its JudgeConfig, default validation.judge); HTTP teachers
    only (a local teacher has no endpoint)."""
    from loop.teacher.client import teacher_key
    from loop.teacher.judge import TeacherJudge

    cfg = ctx.cfg
    if cfg.teacher.kind == "local":
        raise CycleFailed(f"{what}, which needs an HTTP teacher (teacher.kind openai); "
                          "use another grader with a local teacher")
    return TeacherJudge(cfg.teacher, ctx.services.teacher_url, teacher_key(cfg.teacher),
                        judge or cfg.validation.judge, str(cfg.storage.path("teacher-cache.sqlite")))
