"""Sequence-level LoRA distillation: cross-entropy on the teacher's answers, prompt tokens masked.

`train_loop` is the per-worker function Ray Train runs (DDP over gloo on CPU, NCCL on GPU); the
numerics here know nothing about Ray beyond `ray.train.report`. `LoRADistiller` builds and runs the
`TorchTrainer` and returns the adapter directory of the final checkpoint.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

from loop.config import TrainingConfig


def encode_example(tokenizer, messages: list[dict], answer: str, max_len: int) -> tuple[list[int], list[int]]:
    """Token ids of prompt + answer + end-of-turn, and labels with the prompt masked (-100)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    full = prompt + answer + tokenizer.eos_token
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    ids = tokenizer(full, add_special_tokens=False)["input_ids"][:max_len]
    labels = [-100] * min(len(p_ids), len(ids)) + ids[len(p_ids):]
    return ids, labels


def _batches(examples: list[tuple[list[int], list[int]]], batch_size: int, pad_id: int, step: int, rank: int,
             world: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed + step)
    idx = torch.randint(len(examples), (batch_size * world,), generator=g)[rank::world].tolist()
    batch = [examples[i] for i in idx]
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, :len(lab)] = torch.tensor(lab)
        attn[row, :len(ids)] = 1
    return input_ids, labels, attn


def train_loop(config: dict) -> None:
    """Runs on every Ray Train worker. `config` is plain data (paths and TrainingConfig fields)."""
    import ray.train
    import ray.train.torch
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tc = TrainingConfig.model_validate(config["training"])
    if tc.torch_threads:
        # Ray sets OMP_NUM_THREADS to the worker's CPU count (often 1); training wants the cores.
        torch.set_num_threads(tc.torch_threads)
    torch.manual_seed(tc.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()

    tok = AutoTokenizer.from_pretrained(config["base_dir"])
    model = AutoModelForCausalLM.from_pretrained(config["base_dir"], dtype=torch.float32)
    if config.get("init_adapter"):
        # Warm start from the current champion's adapter: the new version continues from it.
        model = PeftModel.from_pretrained(model, config["init_adapter"], is_trainable=True)
    else:
        model = get_peft_model(model, LoraConfig(
            r=tc.lora_rank, lora_alpha=tc.lora_alpha, lora_dropout=tc.lora_dropout,
            target_modules=tc.target_modules, task_type="CAUSAL_LM"))
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()

    rows = [json.loads(line) for line in Path(config["dataset"]).read_text().splitlines() if line.strip()]
    examples = [encode_example(tok, r["messages"], r["completion"], tc.max_seq_len) for r in rows]
    # A prompt longer than max_seq_len leaves no answer token to learn from (and a NaN loss).
    examples = [e for e in examples if any(label != -100 for label in e[1])]
    if not examples:
        raise ValueError(f"every example is longer than training.max_seq_len ({tc.max_seq_len}); raise it")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, tc.max_steps // 10)) * 0.5 * (1 + math.cos(math.pi * s / tc.max_steps)))
    model.train()
    losses = []
    bar = tqdm(range(tc.max_steps), desc="distill", disable=rank != 0, mininterval=2.0)
    for step in bar:
        input_ids, labels, attn = (t.to(device) for t in _batches(
            examples, tc.batch_size, tok.pad_token_id or 0, step, rank, world, tc.seed))
        loss = model(input_ids=input_ids, attention_mask=attn, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")

    metrics = {"loss_first": losses[0], "loss_last": sum(losses[-5:]) / len(losses[-5:]), "steps": len(losses),
               "examples": len(examples)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            unwrapped = model.module if hasattr(model, "module") else model
            unwrapped.save_pretrained(tmp)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


class LoRADistiller:
    """Runs `train_loop` in a Ray Train `TorchTrainer`; `run()` returns (adapter dir, metrics)."""

    def __init__(self, training: TrainingConfig, storage_path: Path, run_name: str):
        self.training, self.storage_path, self.run_name = training, storage_path, run_name

    def run(self, base_dir: Path, dataset: Path, out_dir: Path, init_adapter: str | None = None) -> dict:
        from ray.train import RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        tc = self.training
        trainer = TorchTrainer(
            train_loop,
            train_loop_config={"training": tc.model_dump(), "base_dir": str(base_dir), "dataset": str(dataset),
                               "init_adapter": init_adapter},
            torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=tc.num_workers, use_gpu=tc.use_gpu,
                                         resources_per_worker={"CPU": tc.cpus_per_worker}),
            run_config=RunConfig(name=self.run_name, storage_path=str(self.storage_path)),
        )
        result = trainer.fit()
        if result.checkpoint is None:
            raise RuntimeError(f"training run {self.run_name} finished without a checkpoint: {result.error}")
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with result.checkpoint.as_directory() as ckpt:
            shutil.copytree(ckpt, tmp)
        shutil.rmtree(out_dir, ignore_errors=True)
        tmp.rename(out_dir)
        return dict(result.metrics)
