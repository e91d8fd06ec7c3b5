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
    return conversation_batch(tok, [[{"role": "user", "content": q}] for q in questions])


def conversation_batch(tok, conversations: list[list[dict]]):
    prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    return tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)


def greedy_answers(model, tok, conversations: list[list[dict]], max_new_tokens: int, device=None,
                   batch_size: int = 16) -> list[str]:
    """The model's greedy answers to chat conversations, in left-padded batches."""
    import torch

    side, tok.padding_side = tok.padding_side, "left"
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    try:
        for i in range(0, len(conversations), batch_size):
            enc = conversation_batch(tok, conversations[i:i + batch_size])
            if device is not None:
                enc = enc.to(device)
            with torch.no_grad():
                gen = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                                     eos_token_id=tok.eos_token_id)
            out += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tok.padding_side = side
    return out
