"""The cycle's release stages: registering the version in MLflow, deploying it (challenger or champion),
the canary until the promotion controller decides, and the stage clock. Each is a function of the
cycle's context, its stage directory and MLflow run, and the results it builds on."""
from __future__ import annotations

import time
from pathlib import Path

from loop.cluster import admin
from loop.control.canary import stage_clock
from loop.cycle.context import CycleContext
from loop.cycle.results import (CanaryResult, DeployResult, DraftResult, LabelResult, MergeResult, RegisterResult,
                                TrainResult, ValidationResult, from_json)
from loop.data.label_outputs import replay_sources


def register(ctx: CycleContext, sdir: Path, run_id: str, data: LabelResult, trained: TrainResult,
             merged: MergeResult, val: ValidationResult, drafted: DraftResult) -> RegisterResult:
    lineage = ctx.lineage
    existing = lineage.find_version(ctx.endpoint.id, "adapter_digest", trained.adapter_digest)
    if existing:
        return from_json(RegisterResult, existing)
    artifact = lineage.log_artifacts(trained.run_id, trained.adapter_dir, "adapter")
    info = lineage.register_version(ctx.endpoint.id, trained.run_id, "adapter", {
        "parent_version": trained.parent["version"], "training_run_id": trained.run_id,
        "cycle_run_id": ctx.report.run_id, "dataset_digest": data.dataset_digest,
        "base_digest": ctx.services.base_manifest["digest"], "adapter_digest": trained.adapter_digest,
        "checkpoint_digest": trained.adapter_digest, "merged_digest": merged.merged_digest,
        "draft_digest": drafted.draft_digest, "merged_path": merged.merged_dir, "draft_path": drafted.draft_path,
        "validation_verdict": "pass", "candidate_acc": val.candidate_acc, "champion_acc": val.champion_acc,
        "replay_sources": replay_sources(ctx.dir.parent, ctx.number) if data.replayed else "",
        "trace_sources": f"live:{data.live_traces} imported:{data.imported_traces}",
        "imported_logs": ",".join(data.imports)[:5000], "artifact": artifact,
        **({"engine_identical": val.parity["merged_identical"]} if "merged_identical" in val.parity else {})})
    lineage.log(run_id, tags={"registered_version": info["version"]})
    return from_json(RegisterResult, info)


def deploy(ctx: CycleContext, sdir: Path, run_id: str, reg: RegisterResult) -> DeployResult:
    import ray

    started = time.perf_counter()
    canary = ctx.cfg.promotion.mode == "canary"
    role = "challenger" if canary else "champion"
    rollout = ray.get(ctx.services.rollout_controller.live.remote())[ctx.endpoint.id]
    held = [r for r in ("champion", "challenger") if (rollout[r] or {}).get("number") == reg.number]
    if held:  # a resumed cycle whose deploy went through before the crash: never deployed twice
        role = held[0]
    else:
        # The same path as `POST /admin/deploy`: aliases first, then every replica.
        rollout = admin(ctx.services, "deploy", ctx.endpoint.id, version=reg.number, role=role, by="cycle",
                        **({"weight": ctx.cfg.rollout.challenger_weight} if canary else {}))
    seconds = time.perf_counter() - started
    ctx.lineage.log(run_id, metrics={"reconcile_seconds": seconds}, tags={role: reg.version})
    return DeployResult(role=role, deployed_at=rollout[role]["deployed_at"],
                        challenger_weight=rollout["challenger_weight"], reconcile_seconds=seconds,
                        extra={role: rollout[role]})


def canary(ctx: CycleContext, sdir: Path, run_id: str, reg: RegisterResult) -> CanaryResult:
    """Live evidence on the new version until the promotion controller promotes it or rolls it back."""
    from loop.control.canary import first_served, settled_verdict
    from loop.control.controller import PromotionController

    traces = ctx.cfg.storage.path("traces")
    reg_info = {"number": reg.number, "version": reg.version}
    settled = settled_verdict(ctx.lineage, ctx.endpoint.id, reg_info, traces)
    if settled:  # decided before a crash: the verdict stands, nothing is sent or decided again
        return from_json(CanaryResult, settled)
    controller = PromotionController(ctx.services)
    decision, rounds, sent = (ctx.users.canary if ctx.simulate else lambda c: live_canary(ctx, c))(controller)
    result = CanaryResult(decision=decision.action, reasons=decision.reasons, p_better=decision.p_better,
                          rounds=rounds, requests=sent,
                          first_canary_request_ts=first_served(traces, ctx.endpoint.id, reg.version),
                          extra={"champion": decision.champion, "challenger": decision.challenger})
    ctx.lineage.log(run_id, metrics={"rounds": rounds, "requests": sent,
                                     "p_better": decision.p_better if decision.p_better == decision.p_better else None},
                    tags={"decision": decision.action})
    return result


def live_canary(ctx: CycleContext, controller) -> tuple:
    """Real users: a decision every `promotion.check_interval_s` until `canary_wait_s`; an undecided
    challenger stays live and `loopctl run --forever` goes on deciding."""
    p = ctx.cfg.promotion
    deadline, checks = time.time() + p.canary_wait_s, 0
    ctx.progress(f"  [canary] deciding on live traffic: up to {p.canary_wait_s:.0f} s (promotion.canary_wait_s), "
                 f"a check every {p.check_interval_s:.0f} s, {p.min_samples} outcomes per arm needed; "
                 "undecided, the challenger stays live")
    while True:
        checks += 1
        decision = controller.step(ctx.endpoint.id)
        ctx.progress(f"  [canary] check {checks}: {decision.action}: {decision.reasons[-1]}")
        if decision.action != "continue" or time.time() >= deadline:
            return decision, checks, 0
        time.sleep(p.check_interval_s)


def record_stage_clock(ctx: CycleContext, trained: TrainResult, canaried: CanaryResult) -> None:
    """Checkpoint written -> first canary request, into the report and the cycle's MLflow run."""
    written = trained.record.ended_at if trained.record else None
    clock = stage_clock(ctx.report.stage_seconds, written, canaried.first_canary_request_ts)
    if clock:
        ctx.report.stage_clock = clock
        ctx.lineage.log(ctx.report.run_id, metrics={f"stage_clock.{k}": v for k, v in clock.items()})
