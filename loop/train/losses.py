"""Distillation losses and the regularisers that keep a new checkpoint near the previous one.

Sequence-level distillation is plain cross-entropy on the teacher's text (in `sft.py`). Token-level
distillation matches the teacher's distribution at every answer position: KL(teacher || student)
over the teacher's top-k tokens (an API teacher) or the full vocabulary (a local teacher's logits).
Forgetting is held back by a penalty toward the previous weights: L2, or EWC weighting each
parameter by a diagonal Fisher estimate of how much the old data depends on it.
"""
from __future__ import annotations


def topk_kl(student_logits, top_ids, top_logprobs, mask):
    """Mean over masked positions of KL(p_teacher || p_student) on the teacher's top-k support.

    `student_logits` [B, T, V]; `top_ids` [B, T, K] student-vocabulary ids (-1 where absent);
    `top_logprobs` [B, T, K] teacher log-probabilities; `mask` [B, T] positions that carry a target.
    The teacher's top-k is renormalised to sum to 1; the student's log-probabilities are over the
    whole vocabulary, so mass the student puts elsewhere is penalised."""
    import torch

    logq = torch.log_softmax(student_logits.float(), -1)
    present = top_ids >= 0
    lq = torch.gather(logq, -1, top_ids.clamp(min=0))
    lp = torch.where(present, top_logprobs.float(), torch.full_like(lq, float("-inf")))
    lp = lp - torch.logsumexp(lp, -1, keepdim=True)
    p = lp.exp()
    per_pos = torch.where(present, p * (lp - lq), torch.zeros_like(lq)).sum(-1)
    m = mask.float() * present.any(-1).float()
    return (per_pos * m).sum() / m.sum().clamp(min=1.0)


def full_kl(student_logits, teacher_logits, mask, temperature: float = 1.0):
    """Mean over masked positions of KL(softmax(teacher/T) || softmax(student/T)), times T^2."""
    import torch

    lp = torch.log_softmax(teacher_logits.float() / temperature, -1)
    lq = torch.log_softmax(student_logits.float() / temperature, -1)
    per_pos = (lp.exp() * (lp - lq)).sum(-1)
    m = mask.float()
    return (per_pos * m).sum() / m.sum().clamp(min=1.0) * temperature ** 2


def snapshot(model) -> dict:
    """Detached copies of the trainable parameters: the reference the penalty pulls toward."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def drift_penalty(model, reference: dict, fisher: dict | None = None):
    """sum (theta - theta_ref)^2, weighted by `fisher` per parameter when given (EWC), else L2."""
    import torch

    total = torch.zeros((), device=next(model.parameters()).device)
    for n, p in model.named_parameters():
        if n in reference:
            d = (p - reference[n].to(p.device)) ** 2
            total = total + (d * fisher[n].to(p.device)).sum() if fisher is not None else total + d.sum()
    return total


def fisher_diagonal(model, batches) -> dict:
    """Diagonal empirical Fisher of the trainable parameters: the mean squared gradient of the loss
    over `batches` (dicts of model inputs with `labels`), normalised to mean 1 so one weight knob
    means the same across models."""
    import torch

    fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    n_batches = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for n, p in model.named_parameters():
            if n in fisher and p.grad is not None:
                fisher[n] += p.grad.detach() ** 2
        n_batches += 1
    model.zero_grad(set_to_none=True)
    if n_batches == 0:
        raise ValueError("fisher_diagonal: no batches to estimate from (is the replay buffer empty?)")
    mean = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    return {n: f / mean.clamp(min=1e-12) for n, f in fisher.items()}
