"""Greedy answers of a model directory (optionally with a LoRA adapter on top), and a cache of them by
model: the gate, the general replay and the merge's engine proof ask the same models the same questions.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path


def generate_answers(model_dir: Path, questions: list, max_new_tokens: int, adapter_dir: str | None = None,
                     batch_size: int = 16) -> list[str]:
    """Greedy answers from a model directory (optionally with a LoRA adapter on top) to questions
    (strings, one user turn each) or whole conversations (lists of messages)."""
    import torch
    from transformers import AutoModelForCausalLM

    from loop.models.chat import greedy_answers, left_padded_tokenizer

    tok = left_padded_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter_dir:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    model.eval()
    conversations = [[{"role": "user", "content": q}] if isinstance(q, str) else q for q in questions]
    return greedy_answers(model, tok, conversations, max_new_tokens, batch_size=batch_size)


class AnswerCache:
    """Greedy answers by (model, conversation, max_new_tokens) under storage.root/suites/answers: a
    version's answers never change, so the champion (last cycle's candidate) and the base are asked once."""

    def __init__(self, root: Path | None):
        self.root = root

    def _path(self, model_key: str) -> Path:
        return self.root / f"{hashlib.sha256(model_key.encode()).hexdigest()[:24]}.json"

    def answers(self, model_key: str | None, conversations: list[list[dict]], max_new_tokens: int, ask) -> list[str]:
        """The cached answers, asking `ask(missing conversations)` for the rest."""
        keys = [json.dumps([c, max_new_tokens], sort_keys=True) for c in conversations]
        known = {}
        if self.root is not None and model_key and self._path(model_key).exists():
            known = json.loads(self._path(model_key).read_text())
        missing = [c for c, k in zip(conversations, keys) if k not in known]
        if missing:
            known.update(zip([k for k in keys if k not in known], ask(missing)))
            if self.root is not None and model_key:
                self.root.mkdir(parents=True, exist_ok=True)
                tmp = self._path(model_key).with_suffix(".tmp")
                tmp.write_text(json.dumps(known))
                tmp.replace(self._path(model_key))
        return [known[k] for k in keys]
