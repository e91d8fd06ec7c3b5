"""How well a draft model matches its student, measured the standard way (Leviathan et al., 2023).

At each position the student's next-token distribution is p and the draft's q. Speculative sampling
accepts the draft's token with probability sum_x min(p(x), q(x)) = 1 - TV(p, q) =: alpha. With k
proposed tokens per step, a step yields the accepted prefix plus one token from the student, so the
expected number of accepted draft tokens per step, starting at position t, is
    E_t = sum_{i=1..k} prod_{j=0..i-1} alpha_{t+j}
and the tokens per step are E_t + 1. With one alpha everywhere this is the paper's closed form,
(1 - alpha^(k+1)) / (1 - alpha) tokens per step.
"""
from __future__ import annotations


def token_acceptance(p, q):
    """alpha per position: sum over the vocabulary of min(p, q). `p`, `q`: [..., vocab] probabilities."""
    import torch

    return torch.minimum(p, q).sum(-1)


def expected_accepted(sequences: list[list[float]], k: int) -> float:
    """Mean over every start position t of every sequence of E_t (accepted draft tokens per step with
    k proposals); a window that runs past its sequence's end stops there."""
    if k < 1:
        raise ValueError("k: must be at least 1 proposed token")
    total, n = 0.0, 0
    for alphas in sequences:
        for t in range(len(alphas)):
            run, e = 1.0, 0.0
            for a in alphas[t:t + k]:
                run *= a
                e += run
            total, n = total + e, n + 1
    if n == 0:
        raise ValueError("sequences: need at least one position")
    return total / n


def closed_form_tokens_per_step(alpha: float, k: int) -> float:
    """(1 - alpha^(k+1)) / (1 - alpha): tokens per step for a constant acceptance alpha."""
    return float(k + 1) if alpha >= 1.0 else (1 - alpha ** (k + 1)) / (1 - alpha)


def sequence_alphas(student, draft, input_ids, attention_mask, answer_mask) -> list[list[float]]:
    """alpha at the answer positions of each sequence of a batch (teacher-forced: both models see the
    same tokens). `answer_mask` marks the positions whose next token is part of the answer."""
    import torch

    with torch.no_grad():
        p = torch.softmax(student(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
        q = torch.softmax(draft(input_ids=input_ids, attention_mask=attention_mask).logits.float(), -1)
    alpha = token_acceptance(p, q)
    return [[float(a) for a in row[mask.bool()]] for row, mask in zip(alpha, answer_mask)]
