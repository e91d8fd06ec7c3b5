"""The cycle-0 student of the simulated world (`world.bootstrap`).

A real student was trained on the world as it was at its cutoff, and falls behind as the world moves
on. The fetched base knows nothing of the invented world, so setup gives it that past: a LoRA
adapter distilled from the reference world's answers at `world.bootstrap.epoch` (every training
phrasing of every fact, plus the base's own answers to the routine questions, so it keeps them), merged
into the weights with the merge's proofs. That model is the loop's student: version 1 in the registry,
the static snapshot of the demo report, and what every cycle's adapter starts from.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from loop.config import LoopConfig


def bootstrap_key(cfg: LoopConfig, base_digest: str) -> str:
    """What the cycle-0 student depends on: a change in any of it builds it again."""
    b, w, t = cfg.world.bootstrap, cfg.world, cfg.training
    parts = {"base": base_digest, "world": w.model_dump(exclude={"bootstrap"}), "bootstrap": b.model_dump(),
             "training": t.model_dump(include={"lora_rank", "lora_alpha", "learning_rate", "batch_size",
                                               "max_seq_len", "precision", "seed", "target_modules"})}
    return "sha256:" + hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def bootstrap_student(cfg: LoopConfig, base_dir: Path, out_dir: Path, key: str) -> dict:
    """Teach `base_dir` the world at the bootstrap epoch; the merged model lands in `out_dir` whole or
    not at all. Returns its manifest (with the accuracy before and after on held-out phrasings)."""
    import ray

    from loop.merge.merger import Merger
    from loop.models.fetch import _finish
    from loop.cluster import embedded, init_ray
    from loop.sim.world import GENERAL_QUESTIONS, ROUTINE_QUESTIONS, World, is_correct, states, training_rows
    from loop.train.sft import LoRADistiller
    from loop.models.answers import generate_answers

    def accuracy(facts, answers: list[str]) -> float:
        return sum(is_correct(f, a) for f, a in zip(facts, answers)) / max(1, len(facts))

    b, w = cfg.world.bootstrap, cfg.world
    world = World(w.seed, b.epoch, w.num_entities, w.drift_fraction, w.new_per_epoch)
    work = out_dir.with_name(f".{out_dir.name}-bootstrap")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    heldout = [f.heldout_question() for f in world.facts]
    routine = [q for q, _ in ROUTINE_QUESTIONS]
    general = [q for q, _ in GENERAL_QUESTIONS]

    def general_acc(answers: list[str]) -> float:
        return sum(states(v, a) for (_, v), a in zip(GENERAL_QUESTIONS, answers)) / len(GENERAL_QUESTIONS)

    print(f"[models] the cycle-0 student: {cfg.student.name} learns the world at epoch {b.epoch} "
          f"({len(world.facts)} facts, {b.max_steps} steps)", flush=True)
    answers = generate_answers(base_dir, heldout + general + routine, cfg.traffic.max_tokens)
    before, general_before = accuracy(world.facts, answers), general_acc(answers[len(heldout):])
    rows = training_rows(world.facts) + [
        {"messages": [{"role": "user", "content": q}], "completion": a, "eos": False}
        for q, a in zip(routine, answers[len(heldout) + len(general):])]
    dataset = work / "train.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in rows))
    training = cfg.training.model_copy(update={"max_steps": b.max_steps, "num_workers": 1, "strategy": "ddp",
                                               "use_gpu": False, "replay_ratio": 0.0, "regularizer": "none"})
    # In-process Ray for setup (`loopctl models fetch`), or the cluster it runs on.
    started = not ray.is_initialized() and embedded(cfg)
    init_ray(cfg)
    try:
        LoRADistiller(training, work / "ray", "bootstrap").run(base_dir, dataset, work / "adapter")
    finally:
        if started:
            ray.shutdown()
    report = Merger(cfg.merge).run(base_dir, work / "adapter", work / "merged")
    if not report.passed:
        raise RuntimeError(f"the cycle-0 student's merge failed its proofs: {'; '.join(report.reasons)}")
    answers = generate_answers(work / "merged", heldout + general, cfg.traffic.max_tokens)
    after, general_after = accuracy(world.facts, answers), general_acc(answers[len(heldout):])
    meta = _finish(work / "merged", out_dir, source=f"{base_dir.name} + world epoch {b.epoch}", name=cfg.student.name,
                   bootstrap_key=key, bootstrap={"epoch": b.epoch, "facts": len(world.facts), "steps": b.max_steps,
                                                 "heldout_acc_before": before, "heldout_acc_after": after,
                                                 "general_acc_before": general_before,
                                                 "general_acc_after": general_after,
                                                 "max_abs_logit_diff": report.max_abs_logit_diff})
    shutil.rmtree(work, ignore_errors=True)
    print(f"[models] the cycle-0 student answers {after:.2f} of epoch {b.epoch}'s held-out questions (the base: "
          f"{before:.2f}) and {general_after:.2f} of the general ones (the base: {general_before:.2f})", flush=True)
    return meta
