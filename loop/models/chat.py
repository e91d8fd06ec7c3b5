"""Batches of single-turn chat prompts for Hugging Face models (merge probes, validation)."""
from __future__ import annotations


def left_padded_tokenizer(model_dir):
    """The model's tokenizer, padding on the left so batched generation continues each prompt."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def chat_batch(tok, questions: list[str]):
    """Each question as one user turn with the generation prompt, tokenized and padded."""
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False)
               for q in questions]
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
