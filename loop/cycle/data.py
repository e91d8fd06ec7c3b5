"""The cycle's data stages: the traffic a cycle learns from (simulated users, or the real users' traces),
selection and teacher labels, and the evaluation at its end. Each is a function of the cycle's
context, its stage directory and MLflow run, returning its result (loop/cycle/results.py)."""
from __future__ import annotations

import json
from pathlib import Path

from loop.cycle.context import CycleContext
from loop.cycle.report import CycleFailed
from loop.cycle.results import EvaluateResult, LabelResult, TrafficResult, from_json
from loop.data.label_outputs import (earlier_imports, escalation_labels, previous_cutoff, write_failures, write_replay,
                                     write_split)
from loop.data.select import rated_good, select_prompts
from loop.models.digest import dir_digest
from loop.traces.log import EVAL_USER, read_feedback, tool_traffic


def traffic(ctx: CycleContext, sdir: Path, run_id: str) -> TrafficResult:
    """The demo's round of simulated users, and the champion and the teacher on the current facts."""
    from loop.teacher.client import check_reachable

    if ctx.cfg.teacher.kind != "local":
        check_reachable(ctx.cfg.teacher, ctx.services.teacher_url)
    result = ctx.users.traffic()
    ctx.lineage.log(run_id, metrics={k: result[k] for k in ("requests", "user_acc", "eval_acc", "teacher_acc")})
    return from_json(TrafficResult, result)


def observe(ctx: CycleContext, sdir: Path, run_id: str) -> TrafficResult:
    """Real traffic (`traffic.simulate: false`): nothing is sent; how many requests arrived since the
    last cycle, and who served them. Accuracy is the gate's business (held-out teacher labels)."""
    from loop.traces.log import read_traces

    since = previous_cutoff(ctx.dir.parent, ctx.number)
    rows = [r for r in read_traces(ctx.cfg.storage.path("traces"))
            if r["endpoint"] == ctx.endpoint.id and r["ts"] > since and r["status"] == 200]
    ctx.lineage.log(run_id, metrics={"requests": len(rows)})
    return TrafficResult(requests=len(rows), since=since, served_by=",".join(sorted({r["model_version"] for r in rows})))


def select_and_label(ctx: CycleContext, sdir: Path, run_id: str) -> LabelResult:
    import ray

    from loop.teacher.client import LabelsFailed, split_labels

    ray.get(ctx.services.trace_log.compact.remote())
    parts = ctx.cfg.storage.path("traces", "parquet")
    since = previous_cutoff(ctx.dir.parent, ctx.number)
    # Imported logs (`loopctl traces import`) are read whatever their time, each file by one cycle only.
    ds = ray.data.read_parquet(str(parts)).filter(
        expr=f"endpoint == '{ctx.endpoint.id}' and status == 200 and (ts > {since} or source == 'imported')")
    read = ds.select_columns(["prompt", "user", "ts", "request_id", "tenant", "escalated", "confidence",
                              "completion", "model_version", "source", "source_digest", "tools"]).take_all()
    consumed = earlier_imports(ctx.dir.parent, ctx.number)
    read = [r for r in read if r["source"] != "imported" or r["source_digest"] not in consumed]
    # The next cycle starts after the newest live record read here: nothing falls between cycles.
    cutoff = max((r["ts"] for r in read if r["source"] != "imported"), default=since)
    # What the champion (the version this cycle improves on) answered: a retired version's mistakes,
    # or a rolled-back challenger's, are not evidence about it. Imported history was answered by the
    # team's own system before the loop: evidence about what users ask, whoever answered.
    champion = ctx.lineage.version_info(ctx.endpoint.id, "champion")["version"]
    # A tool-using conversation is not labelled: the teacher would answer it without its tools.
    rows = [r for r in read if not r["user"].startswith(EVAL_USER) and not tool_traffic(r)
            and (r["model_version"] == champion or r["source"] == "imported")]
    imports = sorted({r["source_digest"] for r in rows if r["source"] == "imported"})
    d = ctx.cfg.data
    feedback = read_feedback(ctx.cfg.storage.path("traces"))
    judged = judge_outcomes(ctx, run_id, rows, feedback, "data")
    sel = select_prompts(rows, feedback, max_prompts=d.max_prompts,
                         sample_size=d.sample_size, min_confidence=d.min_confidence,
                         negative_score=d.negative_score, heldout_fraction=d.heldout_fraction, seed=ctx.number)
    prompts, heldout = [r["prompt"] for r in sel.train], {r["prompt"] for r in sel.heldout}
    if not prompts:
        raise CycleFailed(f"no new traffic answered by model-{ctx.endpoint.id}'s champion ({champion}) since the "
                          "last cycle: nothing to learn")
    labeled = _label(ctx, rows, prompts + sorted(heldout))
    try:
        good, failed = split_labels(labeled, ctx.cfg.data.max_failed_fraction)
    except LabelsFailed as e:
        write_failures(sdir / "label_failures.jsonl", e.failed)
        raise CycleFailed(f"{e} (which, and why: {sdir / 'label_failures.jsonl'})") from None
    write_failures(sdir / "label_failures.jsonl", failed)
    cost = {"teacher_cost_usd": sum(r["cost_usd"] for r in labeled) + judged.cost_usd,
            "judged": judged.graded, "judge_cost_usd": judged.cost_usd,
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
                      ctx.cfg.promotion.positive_score, seed=ctx.number)
    path = write_split(sdir, good, heldout, kept)
    general = _general_replay(ctx, path)
    replayed = write_replay(ctx.dir.parent, ctx.number, sdir / "replay.jsonl",
                            round(ctx.cfg.training.replay_ratio * len(trained)))
    digest = dir_digest(sdir)
    cost.update(replayed=replayed, kept=len(kept), general_replay=general,
                **{f"selected_{k}": v for k, v in sel.counts.items()})
    live = sum(r["source"] != "imported" for r in rows)
    imported = len(rows) - live
    ctx.lineage.log(run_id, params={"dataset_digest": digest, "since": since,
                                     "imported_logs": ",".join(imports)[:6000]},
                     metrics={"selected": len(prompts), "labelled": len(good), "label_failed": len(failed),
                              "live_traces": live, "imported_traces": imported, **cost})
    return from_json(LabelResult, {
        "dataset": str(path), "dataset_digest": digest, "selected": len(prompts), "labelled": len(good),
        "kept": len(kept), "label_failed": len(failed), "cutoff": cutoff, "replay": str(sdir / "replay.jsonl"),
        "imports": imports, "live_traces": live, "imported_traces": imported, **cost})


def judge_outcomes(ctx: CycleContext, run_id: str, rows: list[dict], feedback: list[dict], where: str):
    """`data.judge`: the teacher grades the unrated answered requests of `rows`; the grades go
    into the feedback log (and onto `feedback`) as `source: judge` outcomes (loop/control/judged.py)."""
    import ray

    from loop.control.judged import Judged, judge_unrated
    from loop.teacher.judge import outcome_judge

    jcfg = ctx.cfg.data.judge
    if jcfg is None:
        return Judged()

    def append(grades: list[dict]) -> None:
        ray.get(ctx.services.trace_log.append_feedback.remote(grades))
        feedback.extend(grades)

    judged = judge_unrated(jcfg, rows, feedback, outcome_judge(ctx.cfg, ctx.services.teacher_url), append)
    ctx.lineage.log(run_id, metrics=judged.metrics(f"judge.{where}"))
    if judged.stopped:
        ctx.progress(f"  [judge] {where}: graded {judged.graded} of {judged.candidates} unrated answers "
                      f"(stopped at data.judge.{judged.stopped})")
    return judged


def _general_replay(ctx: CycleContext, train: Path) -> int:
    """The base's own answers to `data.general_replay` general prompts, appended to the training set
    (loop/data/general.py); returns how many."""
    d = ctx.cfg.data
    if not d.general_replay:
        return 0
    import ray

    from loop.data.general import base_replay_rows

    task = ray.remote(num_cpus=1)(base_replay_rows)
    rows = ray.get(task.remote(ctx.cfg.model_path(ctx.cfg.student), d.general_replay, ctx.number,
                               d.general_replay_max_tokens, ctx.cfg.storage.path("suites", "answers"),
                               d.general_replay_prompts))
    with open(train, "a") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def _label(ctx: CycleContext, rows: list[dict], prompts: list[str]) -> list[dict]:
    """The teacher's labels for `prompts`; those the cascade escalated reuse the answer it paid for."""
    from loop.teacher.calls import label

    asked, reused = escalation_labels(rows, prompts)
    return (label(ctx.cfg, ctx.services.teacher_url, ctx.epoch, asked) if asked else []) + reused


def evaluate(ctx: CycleContext, sdir: Path, run_id: str) -> EvaluateResult:
    """The champion now and the static snapshot (version 1, the base) on the same questions."""
    if not ctx.simulate:
        live = [ctx.lineage.version_info(ctx.endpoint.id, a) for a in ("champion", "challenger")]
        return EvaluateResult(served_by=",".join(v["version"] for v in live if v))
    earlier = ctx.dir.parent / f"cycle-{ctx.number - 1:04d}" / "evaluate" / "result.json"
    known = json.loads(earlier.read_text()).get("static_regression_acc") if earlier.exists() else None
    result = ctx.users.evaluate(ctx.lineage.version_info_number(ctx.endpoint.id, 1),
                                 known if known == known else None)
    ctx.lineage.log(run_id, metrics={k: v for k in ("eval_acc", "regression_acc", "static_acc",
                                                      "static_regression_acc") if (v := result[k]) == v},
                     tags={"served_by": result["served_by"]})
    return from_json(EvaluateResult, result)
