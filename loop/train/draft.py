"""Draft co-training: after each student checkpoint, the speculative-decoding draft is distilled from
the new student's logits on the same prompts (plus replay), so its proposals keep being accepted.

The draft is a small causal LM with the student's tokenizer (at first the student's first layers,
see `loop.models.fetch.build_draft`); it is trained whole (it is small) with KL(student || draft)
on every position that predicts an answer token. `draft_train_loop` runs in a Ray Train
`TorchTrainer`; `DraftDistiller` runs it and measures acceptance before and after on held-out
prompts, the standard way (`loop.train.acceptance`).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from loop.config import DraftTrainingConfig
from loop.train.sft import fit_to_dir


def draft_train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loop.models.chat import greedy_answers
    from loop.train.losses import full_kl
    from loop.train.sft import answer_positions, autocast, batches, encode_example, worker_setup

    dc = DraftTrainingConfig.model_validate(config["draft_training"])
    rank, world, device = worker_setup(dc.torch_threads, dc.seed)
    tok = AutoTokenizer.from_pretrained(config["student_dir"])
    student = AutoModelForCausalLM.from_pretrained(config["student_dir"], dtype=torch.float32).to(device).eval()
    draft = AutoModelForCausalLM.from_pretrained(config["draft_dir"], dtype=torch.float32)
    draft = ray.train.torch.prepare_model(draft)
    rows = _rows(config["dataset"]) + _rows(config.get("replay"))
    if not rows:
        raise ValueError("draft co-training has no examples: the dataset is empty")
    # On-policy: the draft learns the student's distribution on the student's own answers, which is
    # what speculative decoding verifies its proposals against.
    with autocast(device, dc.precision):
        answers = greedy_answers(student, tok, [r["messages"] for r in rows], dc.max_new_tokens, device)
    pool = []
    for r, answer in zip(rows, answers):
        ids, labels = encode_example(tok, r["messages"], answer, dc.max_seq_len)
        if any(lab != -100 for lab in labels):
            pool.append({"ids": ids, "labels": labels, "kd": None})
    opt = torch.optim.AdamW(draft.parameters(), lr=dc.learning_rate, weight_decay=0.0)
    losses = []
    bar = tqdm(range(dc.max_steps), desc="draft", disable=rank != 0, mininterval=2.0)
    for step in bar:
        b = {n: t.to(device) for n, t in batches(pool, dc.batch_size, tok.pad_token_id or 0, step, rank, world,
                                                  dc.seed).items()}
        mask = answer_positions(b["labels"]).float()
        with torch.no_grad(), autocast(device, dc.precision):
            target = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        with autocast(device, dc.precision):
            logits = draft(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        loss = full_kl(logits.float(), target, mask)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"draft loss is {loss.item()} at step {step}: lower draft_training.learning_rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(draft.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(kl=f"{loss.item():.3f}")
    metrics = {"draft_kl_first": losses[0], "draft_kl_last": sum(losses[-5:]) / len(losses[-5:]),
               "draft_steps": len(losses)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            (draft.module if hasattr(draft, "module") else draft).save_pretrained(tmp)
            tok.save_pretrained(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _rows(path) -> list[dict]:
    if not path or not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def measure_acceptance(student_dir: str | Path, draft_dir: str | Path, questions: list[str], k: int,
                       max_new_tokens: int = 32, threads: int | None = None) -> float:
    """Expected accepted draft tokens per step for k proposals, on the student's own greedy answers
    to `questions` (what speculative decoding verifies against), teacher-forced through both models."""
    import torch
    from transformers import AutoModelForCausalLM

    if threads:
        torch.set_num_threads(threads)

    from loop.models.chat import chat_batch, left_padded_tokenizer
    from loop.train.acceptance import expected_accepted, sequence_alphas

    tok = left_padded_tokenizer(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    enc = chat_batch(tok, questions)
    with torch.no_grad():
        out = student.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    attn = (out != tok.pad_token_id).long()
    attn[:, :enc["input_ids"].shape[1]] = enc["attention_mask"]
    # Positions predicting a generated (non-pad) token: the answer.
    answer = torch.zeros_like(out, dtype=torch.float)
    answer[:, enc["input_ids"].shape[1] - 1:-1] = (out[:, enc["input_ids"].shape[1]:] != tok.pad_token_id).float()
    return expected_accepted(sequence_alphas(student, draft, out, attn, answer), k)


def assisted_generation(student_dir: str | Path, draft_dir: str | Path, questions: list[str],
                        max_new_tokens: int) -> dict:
    """Greedy decoding of each question alone (batch 1), plain and with the draft as Hugging Face's
    assistant model: the wall time of each, their ratio, and how many outputs are identical (all of
    them, when speculative decoding is correct)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    from loop.models.chat import chat_batch, left_padded_tokenizer

    tok = left_padded_tokenizer(student_dir)
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval()
    timings, same = {"plain": 0.0, "assisted": 0.0}, 0
    for q in questions:
        enc = chat_batch(tok, [q])
        outs = {}
        for mode in ("plain", "assisted"):
            extra = {"assistant_model": draft} if mode == "assisted" else {}
            t0 = time.perf_counter()
            with torch.no_grad():
                outs[mode] = student.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                              pad_token_id=tok.pad_token_id, **extra)
            timings[mode] += time.perf_counter() - t0
        same += int(torch.equal(outs["plain"], outs["assisted"]))
    return {"plain_s": timings["plain"], "assisted_s": timings["assisted"],
            "spec_speedup": timings["plain"] / timings["assisted"], "identical_outputs": f"{same}/{len(questions)}",
            "identical": same, "compared": len(questions)}


class DraftDistiller:
    def __init__(self, cfg: DraftTrainingConfig, storage_path: Path, run_name: str):
        self.cfg, self.storage_path, self.run_name = cfg, storage_path, run_name

    def run(self, student_dir: Path, draft_dir: Path, dataset: Path, out_dir: Path,
            replay: Path | None = None) -> dict:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        trainer = TorchTrainer(
            draft_train_loop,
            train_loop_config={"draft_training": self.cfg.model_dump(), "student_dir": str(student_dir),
                               "draft_dir": str(draft_dir), "dataset": str(dataset),
                               "replay": str(replay) if replay else None},
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
            run_config=RunConfig(name=self.run_name, storage_path=str(self.storage_path)),
        )
        return fit_to_dir(trainer, self.run_name, out_dir)
