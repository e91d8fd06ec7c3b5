"""Distillation benchmark: does one cycle recover the teacher's accuracy on a drifted world without
forgetting what the student knew?

One run, on the config's student (default SmolLM2-135M-Instruct) and its `training` section:
  1. cycle 1 learns the world at epoch 1 (every fact's training phrasings, answered by the reference
     teacher; nothing to replay yet, no warm start to regularise toward): the champion adapter
     (`cycle1_acc` on epoch 1's held-out phrasings; `base` and `before` give general answers kept).
  2. the world drifts to epoch 2: some facts change, some are new. Before: the champion's accuracy on
     the held-out phrasings of every epoch-2 fact (`student_acc_before`), on the facts that did not
     change (`earlier`), and on general questions the base student answers right (`general`).
  3. cycle 2 is what selection sends to the teacher once the world moved: the changed and new facts
     only. It is trained warm-started from the champion, twice from the same start:
       - with the config's guards (replay of cycle 1's data at training.replay_ratio, minus the
         prompts cycle 2 relabels, and training.regularizer toward the champion's weights);
       - with replay and regulariser off (`without_guards`).
     After each: the same three accuracies. `recovery` = after / teacher; `regression_drop_pts` =
     100 x (before - after) on the earlier facts and general questions together.
Targets: recovery >= 0.9 and regression_drop_pts <= 2 with the guards.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from loop.config import LoopConfig

GUARDS_IF_UNSET = {"replay_ratio": 1.0, "regularizer": "l2", "reg_weight": 0.01}


def _write(rows: list, path: Path) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _evaluate(student: Path, adapter: Path | None, facts, earlier: set[str], max_new_tokens: int) -> dict:
    from loop.sim.world import GENERAL_QUESTIONS, is_correct, states
    from loop.models.answers import generate_answers

    questions = [f.heldout_question() for f in facts] + [q for q, _ in GENERAL_QUESTIONS]
    answers = generate_answers(student, questions, max_new_tokens, str(adapter) if adapter else None)
    fact_ok = [is_correct(f, a) for f, a in zip(facts, answers)]
    general_ok = [states(v, a) for (_, v), a in zip(GENERAL_QUESTIONS, answers[len(facts):])]
    earlier_ok = [ok for f, ok in zip(facts, fact_ok) if f.entity in earlier]
    retained = earlier_ok + general_ok
    return {"acc": sum(fact_ok) / len(fact_ok), "earlier_acc": sum(earlier_ok) / max(1, len(earlier_ok)),
            "general_acc": sum(general_ok) / len(general_ok), "retained_acc": sum(retained) / len(retained),
            "samples": [{"q": q, "a": a} for q, a in zip(questions[:2] + questions[len(facts):len(facts) + 1],
                                                           answers[:2] + answers[len(facts):len(facts) + 1])]}


def run(cfg: LoopConfig) -> dict:
    import tempfile

    import ray
    import torch

    from loop.data.select import replay_rows
    from loop.models.fetch import read_manifest
    from loop.sim.world import World, is_correct, training_rows
    from loop.train.sft import LoRADistiller

    student = cfg.model_path(cfg.student)
    read_manifest(student)  # a clear error if `loopctl models fetch` was not run
    w, tc = cfg.world, cfg.training
    torch.set_num_threads(tc.torch_threads or 2)
    if tc.replay_ratio <= 0 and tc.regularizer == "none":
        tc = tc.model_copy(update=GUARDS_IF_UNSET)
    bare = tc.model_copy(update={"replay_ratio": 0.0, "regularizer": "none", "reg_weight": 0.0})
    w1, w2 = (World(w.seed, e, w.num_entities, w.drift_fraction, w.new_per_epoch) for e in (1, 2))
    changed = [f for f in w2.facts if f.entity in w2.changed]
    earlier = {f.entity for f in w2.facts if f.entity not in w2.changed}
    n_tokens = cfg.validation.max_new_tokens
    out: dict = {"student": cfg.student.name, "facts": len(w2.facts), "changed_or_new": len(changed),
                 "earlier_facts": len(earlier), "training": {k: getattr(tc, k) for k in (
                     "max_steps", "learning_rate", "lora_rank", "replay_ratio", "regularizer", "reg_weight")}}
    # The reference teacher is the world itself: its answer to each held-out phrasing.
    out["teacher_acc"] = sum(is_correct(f, w2.answer(f.heldout_question())) for f in w2.facts) / len(w2.facts)
    seconds = {}
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, ignore_reinit_error=True)
    try:
        with tempfile.TemporaryDirectory(dir=cfg.storage.path()) as tmp:
            tmp = Path(tmp)
            t = time.perf_counter()
            print("[bench] 1/4 cycle 1: the student learns the world at epoch 1", flush=True)
            d1 = _write(training_rows(w1.facts), tmp / "cycle1.jsonl")
            # As a loop's first cycle runs: the config's settings (nothing to replay yet, and no warm
            # start for the regulariser to hold to).
            LoRADistiller(tc, tmp / "ray", "distill-cycle1").run(student, d1, tmp / "champion")
            seconds["cycle1_train"] = time.perf_counter() - t
            out["cycle1_acc"] = _evaluate(student, tmp / "champion", w1.facts, set(), n_tokens)["acc"]
            print("[bench] 2/4 before: the champion on the drifted world", flush=True)
            out["base"] = _evaluate(student, None, w2.facts, earlier, n_tokens)
            before = _evaluate(student, tmp / "champion", w2.facts, earlier, n_tokens)
            out["before"] = before
            d2 = _write(training_rows(changed), tmp / "cycle2.jsonl")
            replay = replay_rows(d1.read_text().splitlines(), d2.read_text().splitlines(),
                                 round(tc.replay_ratio * len(changed) * 3), seed=2)
            out["replayed"] = len(replay)
            for step, (name, conf) in enumerate((("with_guards", tc), ("without_guards", bare)), start=3):
                t = time.perf_counter()
                print(f"[bench] {step}/4 cycle 2 {name.replace('_', ' ')}", flush=True)
                LoRADistiller(conf, tmp / "ray", f"distill-cycle2-{name}").run(
                    student, d2, tmp / name, init_adapter=str(tmp / "champion"),
                    replay=_write(replay, tmp / "replay.jsonl") if conf.replay_ratio > 0 else None)
                seconds[f"cycle2_{name}_train"] = time.perf_counter() - t
                out[name] = _evaluate(student, tmp / name, w2.facts, earlier, n_tokens)
    finally:
        ray.shutdown()
    out["student_acc_before"] = before["acc"]
    for name in ("with_guards", "without_guards"):
        after = out[name]
        after["recovery"] = after["acc"] / out["teacher_acc"]
        after["regression_drop_pts"] = 100 * (before["retained_acc"] - after["retained_acc"])
        after["earlier_drop_pts"] = 100 * (before["earlier_acc"] - after["earlier_acc"])
        after["general_drop_pts"] = 100 * (before["general_acc"] - after["general_acc"])
    g = out["with_guards"]
    out.update(student_acc_after=g["acc"], recovery=g["recovery"], regression_drop_pts=g["regression_drop_pts"],
               regression_drop_pts_without_guards=out["without_guards"]["regression_drop_pts"],
               recovery_without_guards=out["without_guards"]["recovery"], stage_seconds=seconds,
               targets={"recovery": ">= 0.9", "regression_drop_pts": "<= 2 (with guards)"})
    return out
