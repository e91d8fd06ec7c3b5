"""The local teacher: a Hugging Face model in a Ray actor that shares the student's tokenizer.

It labels prompts with its greedy answers (`LocalTeacherLabeler`, a Ray Data `map_batches` UDF: the
model lives in the pool's actor) and, during training, gives its full next-token distribution at
every answer position (`LocalTeacher.logprobs`, called by each Ray Train worker on a named actor
that `local_teacher_actor` starts), so the student learns from the whole vocabulary, not a top-k.
"""
from __future__ import annotations

from pathlib import Path


class TokenizerMismatch(ValueError):
    pass


def check_same_tokenizer(student_dir: str | Path, teacher_dir: str | Path) -> None:
    """Full-logit distillation compares distributions token by token: the vocabularies must be one."""
    from transformers import AutoTokenizer

    s, t = AutoTokenizer.from_pretrained(student_dir), AutoTokenizer.from_pretrained(teacher_dir)
    if s.get_vocab() != t.get_vocab():
        raise TokenizerMismatch(
            f"teacher.path {teacher_dir} has another tokenizer than the student ({len(t)} vs {len(s)} tokens); "
            "a local teacher must share the student's tokenizer: pick one of its family, or serve it "
            "behind an OpenAI-compatible endpoint and use teacher.kind: openai")


class LocalTeacher:
    """One Hugging Face causal LM, greedy answers and full log-probabilities; no Ray in here."""

    def __init__(self, model_dir: str | Path, max_tokens: int = 48, threads: int | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from loop.models.chat import left_padded_tokenizer

        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tok = left_padded_tokenizer(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()
        self.max_tokens = max_tokens

    def answer(self, conversations: list[list[dict]]) -> list[str]:
        from loop.models.chat import greedy_answers

        return greedy_answers(self.model, self.tok, conversations, self.max_tokens, self.device)

    def logprobs(self, input_ids, attention_mask, positions):
        """log softmax of the next-token logits at `positions` ([B, T] bool), as [N, V] on the CPU."""
        import torch

        with torch.no_grad():
            logits = self.model(input_ids=input_ids.to(self.device),
                                attention_mask=attention_mask.to(self.device)).logits
            return torch.log_softmax(logits[positions.to(self.device)].float(), -1).cpu()


def local_teacher_actor(model_dir: str | Path, name: str, num_gpus: float = 0.0, threads: int | None = None):
    """A named actor holding the teacher for Ray Train workers to ask (`ray.get_actor(name)`).
    It takes no CPU of its own: workers wait on it, they do not compute beside it."""
    import ray

    return ray.remote(LocalTeacher).options(name=name, num_cpus=0, num_gpus=num_gpus).remote(
        str(model_dir), threads=threads)


class LocalTeacherLabeler:
    """Ray Data UDF: the same columns as `TeacherLabeler`, answered by a local model (no cost, no cache:
    a local answer is cheaper to recompute than to look up)."""

    def __init__(self, model_dir: str, max_tokens: int, threads: int | None = None):
        self.teacher = LocalTeacher(model_dir, max_tokens, threads)

    def __call__(self, batch: dict) -> dict:
        import json

        from loop.teacher.client import Label, label_columns, label_problem

        texts = self.teacher.answer([json.loads(m) for m in batch["messages"]])
        return label_columns(batch, [Label(completion=t, error=label_problem(t, None, self.teacher.max_tokens))
                                     for t in texts])
