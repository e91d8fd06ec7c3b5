"""Draft benchmark: does co-training keep the speculative-decoding draft matched to a student that moved?

One run, on the config's student and draft (the default: SmolLM2-135M-Instruct and its 4-layer draft):
  1. the matched draft before drift: the initial draft co-trained on the base student
     -> acceptance_before_drift (base student, that draft)
  2. the student moves: a LoRA distilled on the drifted world's facts (the cycle's training), merged
     -> acceptance_stale (new student, the old draft)
  3. the draft is co-trained on the new student, as a cycle does
     -> acceptance_cotrained (new student, co-trained draft); target: above stale, within 0.05 of before
  4. spec_speedup: wall time of plain greedy decoding / Hugging Face assisted generation with the
     co-trained draft (the same tokens come out), batch 1, on the held-out questions.
  5. vllm_spec_speedup: the same with the merged backend's vLLM engine (`StudentEngine`), without and
     with `speculative_config` (the co-trained draft), one request at a time.
Acceptance is the expected number of accepted draft tokens per step of k proposals, from
sum(min(p, q)) per position, on the student's own greedy answers to held-out questions.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from loop.config import LoopConfig


def _dataset(world, path: Path) -> Path:
    from loop.sim.world import training_rows

    path.write_text("".join(json.dumps(r) + "\n" for r in training_rows(world.facts)))
    return path


def _vllm_speedup(student_dir: Path, draft_dir: Path, engine_cfg: dict, questions: list[str], max_tokens: int) -> dict:
    import ray

    from loop.serving.engine import answer_with_engine

    task = ray.remote(num_cpus=1)(answer_with_engine)
    conversations = [[{"role": "user", "content": q}] for q in questions]
    plain = ray.get(task.remote(str(student_dir), engine_cfg, conversations, max_tokens))
    spec = ray.get(task.remote(str(student_dir), engine_cfg, conversations, max_tokens, draft_dir=str(draft_dir)))
    same = sum(a == b for a, b in zip(plain["texts"], spec["texts"]))
    return {"vllm_plain_s": plain["seconds"], "vllm_spec_s": spec["seconds"],
            "vllm_spec_speedup": plain["seconds"] / spec["seconds"], "vllm_tokens": plain["tokens"],
            "vllm_identical_outputs": f"{same}/{len(questions)}"}


def run(cfg: LoopConfig) -> dict:
    import tempfile

    import ray
    import torch

    from loop.merge.merger import Merger
    from loop.models.fetch import read_manifest
    from loop.sim.world import World
    from loop.train.draft import DraftDistiller, assisted_generation, measure_acceptance
    from loop.train.sft import LoRADistiller

    student, draft0 = cfg.model_path(cfg.student), cfg.model_path(cfg.draft)
    read_manifest(student), read_manifest(draft0)  # a clear error if `loopctl models fetch` was not run
    w, dc = cfg.world, cfg.draft_training
    k, threads = dc.num_speculative_tokens, cfg.training.torch_threads or 2
    torch.set_num_threads(threads)
    before_world, after_world = (World(w.seed, e, w.num_entities, w.drift_fraction, w.new_per_epoch) for e in (1, 2))
    heldout = [f.heldout_question() for f in after_world.facts]
    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, ignore_reinit_error=True)
    out: dict = {"student": cfg.student.name, "draft": cfg.draft.name, "k": k, "questions": len(heldout),
                 "max_new_tokens": dc.max_new_tokens}
    try:
        with tempfile.TemporaryDirectory(dir=cfg.storage.path()) as tmp:
            tmp = Path(tmp)
            steps = {}
            t = time.perf_counter()
            print("[bench] 1/5 co-train the initial draft on the base student", flush=True)
            DraftDistiller(dc, tmp / "ray", "draft-before").run(student, draft0, _dataset(before_world, tmp / "before.jsonl"),
                                                                tmp / "draft-before")
            out["acceptance_before_drift"] = measure_acceptance(student, tmp / "draft-before", heldout, k,
                                                                dc.max_new_tokens, threads)
            steps["cotrain_before_s"] = time.perf_counter() - t
            t = time.perf_counter()
            print("[bench] 2/5 the student learns the drifted world (LoRA, merged)", flush=True)
            after = _dataset(after_world, tmp / "after.jsonl")
            LoRADistiller(cfg.training, tmp / "ray", "student-after").run(student, after, tmp / "adapter")
            Merger(cfg.merge).run(student, tmp / "adapter", tmp / "student-after")
            out["acceptance_stale"] = measure_acceptance(tmp / "student-after", tmp / "draft-before", heldout, k,
                                                         dc.max_new_tokens, threads)
            steps["student_train_s"] = time.perf_counter() - t
            t = time.perf_counter()
            print("[bench] 3/5 co-train the draft on the new student", flush=True)
            metrics = DraftDistiller(dc, tmp / "ray", "draft-after").run(tmp / "student-after", tmp / "draft-before",
                                                                         after, tmp / "draft-after")
            out["acceptance_cotrained"] = measure_acceptance(tmp / "student-after", tmp / "draft-after", heldout, k,
                                                             dc.max_new_tokens, threads)
            steps["cotrain_after_s"] = time.perf_counter() - t
            out["draft_kl_first"], out["draft_kl_last"] = metrics["draft_kl_first"], metrics["draft_kl_last"]
            print("[bench] 4/5 speculative decoding speed-up (HF assisted generation)", flush=True)
            out.update(assisted_generation(tmp / "student-after", tmp / "draft-after", heldout, dc.max_new_tokens))
            print("[bench] 5/5 speculative decoding speed-up (vLLM speculative_config, the merged backend's engine)",
                  flush=True)
            engine_cfg = cfg.serving.engine.model_dump()
            out.update(_vllm_speedup(tmp / "student-after", tmp / "draft-after", engine_cfg, heldout,
                                     dc.max_new_tokens))
            out["stage_seconds"] = steps
    finally:
        ray.shutdown()
    out["cotrained_over_stale"] = out["acceptance_cotrained"] - out["acceptance_stale"]
    out["cotrained_vs_before"] = out["acceptance_cotrained"] - out["acceptance_before_drift"]
    out["targets"] = {"acceptance_cotrained": "> acceptance_stale, within 0.05 of acceptance_before_drift"}
    out["speculative_decoding"] = ("spec_speedup: Hugging Face assisted generation (transformers); vllm_spec_speedup: "
                                   "vLLM speculative_config method draft_model, k = serving.engine.num_speculative_tokens;"
                                   " both batch 1, greedy, CPU fp32")
    return out
