"""What several benchmarks share: an adapter trained as a loop's first cycle trains it (cached), and
the gated path from that adapter to a validated merged model, timed stage by stage."""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

from loop.config import LoopConfig


def first_world(cfg: LoopConfig):
    from loop.sim.world import World

    w = cfg.world
    return World(w.seed, 1, w.num_entities, w.drift_fraction, w.new_per_epoch)


def _cached(cfg: LoopConfig, kind: str, key_parts: list, train) -> tuple[Path, float | None]:
    """`train(tmp_dir)` once per key under .loop/bench-cache/<kind>-<key>; (dir, seconds trained this
    run or None when cached)."""
    key = hashlib.sha256(json.dumps(key_parts, sort_keys=True, default=str).encode()).hexdigest()[:12]
    out = cfg.storage.path("bench-cache", f"{kind}-{key}")
    if (out / "config.json").exists() or (out / "adapter_config.json").exists():
        return out, None
    print(f"[bench] training the {kind} a first cycle would (cached afterwards in {out})", flush=True)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    started = time.perf_counter()
    train(tmp)
    seconds = time.perf_counter() - started
    tmp.rename(out)
    return out, seconds


def _first_dataset(cfg: LoopConfig, path: Path) -> Path:
    from loop.sim.world import training_rows

    path.write_text("".join(json.dumps(r) + "\n" for r in training_rows(first_world(cfg).facts)))
    return path


def trained_adapter(cfg: LoopConfig) -> tuple[Path, float | None]:
    """The student's LoRA adapter after a first cycle on the world at epoch 1 (every fact's training
    phrasings, the teacher's answers; cfg.training), cached by student digest, training and world
    settings. Needs Ray (training is Ray Train)."""
    from loop.models.fetch import read_manifest
    from loop.train.sft import LoRADistiller

    student = cfg.model_path(cfg.student)

    def train(tmp: Path) -> None:
        LoRADistiller(cfg.training, cfg.storage.path("ray_train"), "bench-adapter").run(
            student, _first_dataset(cfg, tmp.parent / "bench-adapter.jsonl"), tmp)

    return _cached(cfg, "adapter", [read_manifest(student)["digest"], cfg.training.model_dump(),
                                    cfg.world.model_dump()], train)


def cotrained_draft(cfg: LoopConfig, adapter: Path, merged: Path) -> tuple[Path, float | None]:
    """The config's draft co-trained on the merged student (cfg.draft_training), as a cycle's draft
    stage does; cached by the adapter and the draft settings."""
    from loop.train.draft import DraftDistiller

    def train(tmp: Path) -> None:
        DraftDistiller(cfg.draft_training, cfg.storage.path("ray_train"), "bench-draft").run(
            merged, cfg.model_path(cfg.draft), _first_dataset(cfg, tmp.parent / "bench-draft.jsonl"), tmp)

    return _cached(cfg, "draft", [adapter.name, cfg.draft_training.model_dump()], train)


def gated_path(cfg: LoopConfig, adapter: Path, out: Path) -> dict:
    """Adapter -> merged model -> proofs -> the draft's acceptance -> the gate -> serving parity (the
    merged engine with the draft, which is also the merge's proof 4), as a first cycle's merge and
    validate stages run them (the champion is the base student). The draft co-trained on the merged
    student (cached; training, so outside total_s) sits between merge and acceptance, as in a cycle.
    Stage seconds, the verdict and its reasons. Needs Ray (training and the engine run in it)."""
    import ray

    from loop.merge.merger import decoded, Merger
    from loop.serving.engine import answer_with_engine
    from loop.sim.users import world_suites
    from loop.train.draft import measure_acceptance
    from loop.validate.gate import Validator

    student = cfg.model_path(cfg.student)
    world = first_world(cfg)
    facts = world.facts
    questions = [f.heldout_question() for f in facts]
    stages: dict = {}
    started = time.perf_counter()
    report = Merger(cfg.merge).run(student, adapter, out / "merged")
    stages["merge_write_s"] = report.merge_seconds
    stages["proofs_s"] = report.seconds - report.merge_seconds
    merged = out / "merged"
    t = time.perf_counter()
    draft, draft_train_s = cotrained_draft(cfg, adapter, merged)
    untimed = time.perf_counter() - t
    t = time.perf_counter()
    dc = cfg.draft_training
    acceptance = measure_acceptance(merged, draft, questions, dc.num_speculative_tokens,
                                    max_new_tokens=dc.max_new_tokens, threads=cfg.training.torch_threads or 2)
    stages["draft_acceptance_s"] = time.perf_counter() - t
    t = time.perf_counter()
    heldout = [{"messages": [{"role": "user", "content": q}], "completion": f.answer()}
               for f, q in zip(facts, questions)][:8]
    val = Validator(cfg.validation, cfg.storage.path("suites")).run(merged, student, None, world_suites(world),
                                                                    heldout, str(draft), acceptance)
    stages["gate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    n = cfg.validation.parity_questions
    eng = cfg.serving.engine
    task = ray.remote(num_cpus=eng.num_cpus, num_gpus=eng.num_gpus)(answer_with_engine)
    got = ray.get(task.remote(str(merged), eng.model_dump(), [[{"role": "user", "content": q}] for q in questions[:n]],
                              cfg.validation.max_new_tokens, draft_dir=str(draft)))
    same = sum(a == b for a, b in zip(decoded(merged, got["token_ids"]), val.reference_answers))
    stages["serving_parity_s"] = time.perf_counter() - t
    reasons = report.reasons + val.reasons
    if same != n:
        reasons.append(f"serving parity: {n - same} of {n} answers differ")
    return {"stages_s": stages, "total_s": time.perf_counter() - started - untimed, "draft_trained_s": draft_train_s,
            "passed": report.passed and not reasons,
            "reasons": reasons, "max_abs_logit_diff": report.max_abs_logit_diff, "candidate_acc": val.candidate_acc,
            "champion_acc": val.champion_acc, "regression_candidate": val.regression_candidate,
            "regression_champion": val.regression_champion, "teacher_agreement": val.teacher_agreement,
            "draft_acceptance": acceptance, "spec_identical": val.spec_identical, "draft_dir": str(draft),
            "engine_identical": f"{same}/{n}"}
