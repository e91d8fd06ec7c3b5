"""Tiny random Llama-architecture models with a tiny byte-level BPE tokenizer, for tests.

Built from config only: nothing is downloaded. The tokenizer is trained on the simulated world's
text so prompts tokenize into a few dozen tokens, and it carries a ChatML chat template like SmolLM2.
"""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_tiny_tokenizer(corpus: list[str], vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    chat = ["<|im_start|>user\n", "<|im_start|>assistant\n", "system", "I don't know."]
    tok.train_from_iterator(corpus + chat, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        bos_token="<|im_start|>", unk_token="<|endoftext|>", chat_template=CHAT_TEMPLATE)


def build_tiny_model(out_dir: str | Path, corpus: list[str], *, hidden_size: int = 64,
                     num_layers: int = 2, num_heads: int = 2, seed: int = 0,
                     initializer_range: float = 0.2) -> Path:
    """Write a random 2-layer Llama (hidden 64) and its tokenizer to `out_dir`; returns the dir.

    `initializer_range` is 10x the usual 0.02: with the usual value the frozen tied head yields
    near-flat logits that a LoRA adapter cannot sharpen, so a tiny student could never learn.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tiny_tokenizer(corpus)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_heads,
        max_position_embeddings=512, tie_word_embeddings=True, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        initializer_range=initializer_range, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
