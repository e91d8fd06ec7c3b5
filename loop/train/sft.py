"""LoRA distillation: cross-entropy on the teacher's answers (prompt tokens masked), plus token-level
KL to the teacher's top-k log-probabilities where it gave them (or to a local teacher's full
distribution at every answer position, asked of its Ray actor each step), plus an optional penalty toward the
warm-start weights (L2 or EWC), on new examples mixed with replayed ones from earlier cycles; plus an
optional anchor to the base: KL(base || student) on the base's own answers to general prompts,
riding in every batch (`training.anchor_weight`; the base is the student with its adapter off).

`train_loop` is the per-worker function Ray Train runs (DDP over gloo on CPU, NCCL on GPU); the
numerics here know nothing about Ray beyond `ray.train.report` and the teacher actor. `LoRADistiller` builds and runs the
`TorchTrainer` and returns the adapter directory of the final checkpoint.
"""
from __future__ import annotations

import errno
import json
import math
import shutil
import tempfile
from pathlib import Path

from loop.config import TrainingConfig


def encode_example(tokenizer, messages: list[dict], answer: str, max_len: int,
                   eos: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer (+ end-of-turn unless `eos` is False: an answer that may have been
    cut short), and labels with the prompt masked (-100)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = prompt + answer + (tokenizer.eos_token if eos else "")
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_len]
    labels = [-100] * min(len(p_ids), len(ids)) + ids[len(p_ids):]
    return ids, labels


def kd_targets(tokenizer, ids: list[int], labels: list[int], top_logprobs: list | None):
    """The teacher's top-k per answer token, placed at the positions whose logits predict it, as
    (position, [student ids], [log-probs]) triples; None when the teacher's tokens are not the
    student's (another tokenizer): that example then learns from the text alone."""
    if not top_logprobs:
        return None
    start = next((i for i, lab in enumerate(labels) if lab != -100), None)
    if start is None:
        return None

    def one_id(text: str) -> int:
        got = tokenizer(text, add_special_tokens=False)["input_ids"]
        return got[0] if len(got) == 1 else -1

    out = []
    for i, alternatives in enumerate(top_logprobs):
        pos = start + i
        if pos >= len(ids) or not alternatives:
            break
        top_ids = [one_id(tok) for tok, _ in alternatives]
        if top_ids[0] != ids[pos]:
            return None  # misaligned: the teacher's best token is not the student's token here
        out.append((pos - 1, top_ids, [float(lp) for _, lp in alternatives]))
    return out or None


def answer_loss(logits, labels, keep):
    """Cross-entropy of `logits` [B, K, V] at positions `keep` [K] (each predicting the next token)
    against `labels` [B, T]: the mean over answer tokens, as the full-sequence loss is."""
    import torch

    targets = labels[:, keep + 1]
    return torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)


def answer_positions(labels):
    """[B, T] bool: the logit positions whose next token is an answer token (labels not yet shifted)."""
    import torch

    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _pick(examples: list[dict], batch_size: int, step: int, rank: int, world: int, seed: int) -> list[dict]:
    """This worker's share of the step's `batch_size * world` examples (seeded by step)."""
    import torch

    g = torch.Generator().manual_seed(seed + step)
    idx = torch.randint(len(examples), (batch_size * world,), generator=g)[rank::world].tolist()
    return [examples[i] for i in idx]


def batches(examples: list[dict], batch_size: int, pad_id: int, step: int, rank: int, world: int, seed: int,
            k: int = 0):
    """One batch of `examples` ({"ids", "labels", "kd"}) for this worker: input ids, labels, attention
    mask, and (with k > 0) the teacher's top-k ids / log-probs / mask per position."""
    return _collate(_pick(examples, batch_size, step, rank, world, seed), pad_id, k)


def _collate(batch: list[dict], pad_id: int, k: int = 0) -> dict:
    import torch

    width = max(len(e["ids"]) for e in batch)
    out = {"input_ids": torch.full((len(batch), width), pad_id, dtype=torch.long),
           "labels": torch.full((len(batch), width), -100, dtype=torch.long),
           "attention_mask": torch.zeros((len(batch), width), dtype=torch.long)}
    if k:
        out.update(top_ids=torch.full((len(batch), width, k), -1, dtype=torch.long),
                   top_lps=torch.zeros((len(batch), width, k)), kd_mask=torch.zeros((len(batch), width)))
    for row, e in enumerate(batch):
        out["input_ids"][row, :len(e["ids"])] = torch.tensor(e["ids"])
        out["labels"][row, :len(e["labels"])] = torch.tensor(e["labels"])
        out["attention_mask"][row, :len(e["ids"])] = 1
        for pos, top_ids, lps in (e.get("kd") or []) if k else []:
            out["top_ids"][row, pos, :len(top_ids[:k])] = torch.tensor(top_ids[:k])
            out["top_lps"][row, pos, :len(lps[:k])] = torch.tensor(lps[:k])
            out["kd_mask"][row, pos] = 1
    return out


def load_examples(tokenizer, path: str | Path | None, max_len: int) -> list[dict]:
    """Encoded rows of a dataset file (JSONL of {"messages", "completion", "top_logprobs"?})."""
    if not path or not Path(path).exists():
        return []
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        ids, labels = encode_example(tokenizer, row["messages"], row["completion"], max_len, row.get("eos", True))
        # A prompt longer than max_len leaves no answer token to learn from (and a NaN loss).
        if any(lab != -100 for lab in labels):
            out.append({"ids": ids, "labels": labels, "kd": kd_targets(tokenizer, ids, labels, row.get("top_logprobs")),
                        "source": row.get("source", "")})
    return out


def worker_setup(threads: int | None, seed: int) -> tuple[int, int, object]:
    """Threads and seed of this Ray Train worker; returns its rank, the world size and its device."""
    import ray.train
    import ray.train.torch
    import torch

    if threads:
        # Ray sets OMP_NUM_THREADS to the worker's CPU count (often 1); training wants the cores.
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    ctx = ray.train.get_context()
    return ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.get_device()


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. `config` is plain data (paths and TrainingConfig fields)."""
    import ray.train
    import ray.train.torch
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loop.train.losses import drift_penalty, fisher_diagonal, full_kl, snapshot, topk_kl

    tc = TrainingConfig.model_validate(config["training"])
    rank, world, device = worker_setup(tc.torch_threads, tc.seed)

    tok = AutoTokenizer.from_pretrained(config["base_dir"])
    model = AutoModelForCausalLM.from_pretrained(config["base_dir"], dtype=torch.float32)
    if config.get("init_adapter"):
        # Warm start from the current champion's adapter: the new version continues from it.
        model = PeftModel.from_pretrained(model, config["init_adapter"], is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(
            r=tc.lora_rank, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
            target_modules=tc.target_modules, task_type="CAUSAL_LM"))
    engine = None
    if tc.strategy == "ddp":
        model = ray.train.torch.prepare_model(model)
    else:
        model = model.to(device)

    examples = load_examples(tok, config["dataset"], tc.max_seq_len)
    if not examples:
        raise ValueError(f"every example is longer than training.max_seq_len ({tc.max_seq_len}); raise it")
    replay = load_examples(tok, config.get("replay"), tc.max_seq_len)
    # The base's own answers to general prompts (data.general_replay): with an anchor they leave the
    # pool and are matched to the base's distribution in a batch of their own at every step.
    anchors = [e for e in examples if e["source"] == "base"] if tc.anchor_weight > 0 else []
    examples = [e for e in examples if e["source"] != "base"] if anchors else examples
    pool = examples + replay
    k = max((len(t) for e in pool for _, t, _ in (e["kd"] or [])), default=0) if tc.kd_weight > 0 else 0
    # A local teacher gives its whole distribution at every answer position (it shares the tokenizer).
    teacher = ray.get_actor(config["teacher_actor"]) if config.get("teacher_actor") and tc.kd_weight > 0 else None
    pad = tok.pad_token_id or 0
    # Guards start with the second cycle (a warm start): on a first one, L2 toward the base itself kept
    # 2 more of 15 general answers but halved what the cycle learned (`loopctl bench distill`, README),
    # and EWC needs old data to weigh parameters by.
    guarded = (tc.regularizer != "none" and tc.reg_weight > 0 and bool(config.get("init_adapter"))
               and (tc.regularizer == "l2" or bool(replay)))
    reference = snapshot(model) if guarded else None
    fisher = None
    if reference is not None and tc.regularizer == "ewc":
        fisher = fisher_diagonal(model, [_model_inputs(_collate(replay[i:i + tc.batch_size], pad), device)
                                         for i in range(0, min(len(replay), 8 * tc.batch_size), tc.batch_size)])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, tc.max_steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / tc.max_steps)))
    if tc.strategy == "deepspeed":
        engine, opt, _, sched = _deepspeed(model, opt, sched, tc, world)
        model = engine
    model.train()
    losses, kls, anchor_kls = [], [], []
    bar = tqdm(range(tc.max_steps), desc="distill", disable=rank != 0, mininterval=2.0)
    for step in bar:
        rows = _pick(pool, tc.batch_size, step, rank, world, tc.seed)
        # Anchor rows ride in the same forward (one graph per step, as DDP wants), after the others.
        rows += _pick(anchors, tc.anchor_batch_size, step, rank, world, tc.seed + 1) if anchors else []
        batch = {n: t.to(device) for n, t in _collate(rows, pad, k).items()}
        anchored = torch.arange(len(rows), device=device) >= tc.batch_size
        labels = batch["labels"].masked_fill(anchored[:, None], -100)
        # Logits only where some row predicts an answer token (the prompt's are never scored): the
        # output layer over a 49k vocabulary is a fifth of a small model's step.
        keep = answer_positions(batch["labels"]).any(0).nonzero().flatten()
        with autocast(device, tc.precision):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           logits_to_keep=keep).logits
        loss = answer_loss(logits, labels, keep)
        if k and batch["kd_mask"].any():
            kl = topk_kl(logits.float(), batch["top_ids"][:, keep], batch["top_lps"][:, keep], batch["kd_mask"][:, keep])
            loss = loss + tc.kd_weight * kl
            kls.append(kl.item())
        if teacher is not None:
            where = answer_positions(labels)
            target = ray.get(teacher.logprobs.remote(batch["input_ids"].cpu(), batch["attention_mask"].cpu(), where.cpu()))
            kl = full_kl(logits[where[:, keep]].float(), target.to(device), torch.ones(target.shape[0], device=device))
            loss = loss + tc.kd_weight * kl
            kls.append(kl.item())
        if reference is not None:
            loss = loss + tc.reg_weight * drift_penalty(model, reference, fisher)
        if anchors:
            anchor = anchor_kl(model, batch, logits, keep, anchored, device, tc.precision)
            loss = loss + tc.anchor_weight * anchor
            anchor_kls.append(anchor.item())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {step}: lower "
                                     f"training.learning_rate (now {tc.learning_rate}) or check the dataset")
        if engine is not None:  # DeepSpeed owns clipping, the optimizer step and the schedule
            engine.backward(loss)
            engine.step()
        else:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")

    metrics = {"loss_first": losses[0], "loss_last": sum(losses[-5:]) / len(losses[-5:]), "steps": len(losses),
               "examples": len(examples), "replay_examples": len(replay),
               "kd_examples": sum(e["kd"] is not None for e in pool),
               "zero_stage": engine.zero_optimization_stage() if engine is not None else 0, "workers": world}
    if kls:
        metrics.update(kd_kl_first=kls[0], kd_kl_last=sum(kls[-5:]) / len(kls[-5:]))
    if anchor_kls:
        metrics.update(anchor_examples=len(anchors), anchor_kl_first=anchor_kls[0],
                       anchor_kl_last=sum(anchor_kls[-5:]) / len(anchor_kls[-5:]))
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        unwrapped = model.module if hasattr(model, "module") else model
        state = _full_adapter_state(unwrapped, engine, tc)  # every rank joins a ZeRO-3 gather
        if rank == 0:
            unwrapped.save_pretrained(tmp, state_dict=state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def anchor_kl(model, batch: dict, logits, keep, anchored, device, precision: str):
    """KL(base || student) at the answer positions of the `anchored` rows of `batch`, the student's
    being `logits` (at positions `keep`): the base is the same model with its adapter switched off
    (no second copy of the weights, no gradient through it)."""
    import torch

    from loop.train.losses import full_kl

    peft_model = model.module if hasattr(model, "module") else model  # DDP / DeepSpeed wrap it
    with torch.no_grad(), peft_model.disable_adapter(), autocast(device, precision):
        base = peft_model(input_ids=batch["input_ids"][anchored], attention_mask=batch["attention_mask"][anchored],
                          logits_to_keep=keep).logits
    mask = answer_positions(batch["labels"][anchored])[:, keep]
    return full_kl(logits[anchored][mask].float(), base[mask].float(), torch.ones(int(mask.sum()), device=device))


def _deepspeed(model, opt, sched, tc: TrainingConfig, world: int):
    """DeepSpeed ZeRO over the process group Ray Train already made (gloo on CPU)."""
    import os

    if not tc.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed first picks its accelerator
    import deepspeed

    # Buckets no larger than what is trained (the LoRA weights): DeepSpeed's default 5e8 elements is a
    # 2 GB buffer per worker for a few hundred thousand adapter parameters, most of ZeRO-2's start.
    bucket = int(min(5e8, max(1e6, sum(p.numel() for p in model.parameters() if p.requires_grad))))
    zero = {"stage": tc.zero_stage, "reduce_bucket_size": bucket, "allgather_bucket_size": bucket}
    ds_config = {"train_micro_batch_size_per_gpu": tc.batch_size, "gradient_accumulation_steps": 1,
                 "train_batch_size": tc.batch_size * world, "gradient_clipping": 1.0,
                 "zero_optimization": zero, "steps_per_print": 10 ** 9,
                 "zero_allow_untested_optimizer": True}
    return deepspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=ds_config,
                                dist_init_required=False)


def _full_adapter_state(model, engine, tc: TrainingConfig) -> dict | None:
    """The adapter's whole tensors (ZeRO-3 gathers its shards; otherwise peft reads them itself)."""
    if engine is None or tc.zero_stage != 3:
        return None
    import deepspeed
    from peft import get_peft_model_state_dict

    params = [p for p in model.parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {k: v.detach().clone().cpu() for k, v in get_peft_model_state_dict(model).items()}


def autocast(device, precision: str):
    """bfloat16 autocast for `bf16-mixed` (weights, gradients and optimizer stay fp32; `auto` where
    bfloat16 is native, loop/platform.py), else nothing."""
    import torch

    from loop.platform import resolve_precision

    enabled = resolve_precision(precision, device.type) == "bf16-mixed"
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


def _model_inputs(batch: dict, device) -> dict:
    return {n: batch[n].to(device) for n in ("input_ids", "attention_mask", "labels")}


class LoRADistiller:
    """Runs `train_loop` in a Ray Train `TorchTrainer`; `run()` returns (adapter dir, metrics)."""

    def __init__(self, training: TrainingConfig, storage_path: Path, run_name: str):
        self.training, self.storage_path, self.run_name = training, storage_path, run_name

    def run(self, base_dir: Path, dataset: Path, out_dir: Path, init_adapter: str | None = None,
            replay: Path | None = None, teacher_dir: Path | None = None, teacher_gpus: float = 0.0) -> dict:
        """`teacher_dir`: a local teacher (same tokenizer) whose full logits the KD term matches."""
        import ray
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        from loop.teacher.local import check_same_tokenizer, local_teacher_actor

        tc = self.training
        actor, name = None, None
        if teacher_dir is not None:
            check_same_tokenizer(base_dir, teacher_dir)
            name = f"loop-teacher-{self.run_name}"
            actor = local_teacher_actor(teacher_dir, name, teacher_gpus, tc.torch_threads)
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"training": tc.model_dump(), "base_dir": str(base_dir), "dataset": str(dataset),
                               "init_adapter": init_adapter, "replay": str(replay) if replay else None,
                               "teacher_actor": name},
            torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                         resources_per_worker={"CPU": tc.cpus_per_worker}),
            run_config=RunConfig(name=self.run_name, storage_path=str(self.storage_path)),
        )
        try:
            return fit_to_dir(trainer, self.run_name, out_dir)
        finally:
            if actor is not None:
                ray.kill(actor)


class TrainingDiverged(RuntimeError):
    """The loss went NaN or infinite; the message says at which step and which knob to turn."""


class CheckpointNotWritten(RuntimeError):
    """The disk filled while the checkpoint was written; nothing partial was kept."""


def fit_to_dir(trainer, run_name: str, out_dir: Path) -> dict:
    """Run a Ray Train trainer; its final checkpoint becomes `out_dir` whole or not at all. A
    diverged run (a worker's FloatingPointError) raises TrainingDiverged with the worker's line."""
    import re

    try:
        result = trainer.fit()
    except Exception as e:  # noqa: BLE001 - re-raised unless it is a divergence
        failures = list((getattr(e, "worker_failures", None) or {}).values())
        text = "\n".join([str(e)] + [str(f) for f in failures])
        found = re.search(r"FloatingPointError: (.+)", text)
        if found:
            raise TrainingDiverged(f"training run {run_name} diverged: {found.group(1).strip()}") from None
        if "No space left on device" in text:
            raise CheckpointNotWritten(f"no space left on the disk writing the checkpoint of {run_name} "
                                       "(training.storage under storage.root); free space and run again") from None
        raise
    if result.checkpoint is None:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint: {result.error}")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with result.checkpoint.as_directory() as ckpt:
            shutil.copytree(ckpt, tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing partial stays behind
        if e.errno == errno.ENOSPC or "No space left" in str(e):
            raise CheckpointNotWritten(f"no space left on the disk of {out_dir.parent} writing the checkpoint of "
                                       f"{run_name}; free space there and run again (nothing was kept)") from None
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return dict(result.metrics)
