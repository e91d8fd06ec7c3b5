"""Serving parity: what the engines would serve equals what the gate scored.

The gate scores greedy Hugging Face answers of the merged model (proven equal to base + adapter).
Here the same conversations go to vLLM twice: the candidate's adapter on the running multi-LoRA engine
(the `multi_lora` backend, nothing redeployed), and a temporary engine on the merged weights with
the version's draft as speculative decoder (the `merged` backend). Every answer must equal the
reference text; each difference is a reason, and a reason fails the gate.
"""
from __future__ import annotations

from loop.config import LoopConfig


def serving_parity(cfg: LoopConfig, merged_dir: str, adapter_dir: str, draft_dir: str | None,
                   conversations: list[list[dict]], reference: list[str], max_tokens: int) -> tuple[dict, list[str]]:
    import asyncio

    import ray

    from loop.merge.merger import decoded
    from loop.serving.engine import answer_with_engine

    out: dict = {"questions": len(conversations)}
    reasons = []
    answers = {}
    if any(e.backend == "multi_lora" for _, e in cfg.endpoints()):
        answers["multi_lora"] = asyncio.run(_multi_lora(adapter_dir, conversations, max_tokens))
    if merged_parity(cfg):
        eng = cfg.serving.engine
        task = ray.remote(num_cpus=eng.num_cpus, num_gpus=eng.num_gpus)(answer_with_engine)
        answers["merged"] = ray.get(task.remote(merged_dir, eng.model_dump(), conversations, max_tokens,
                                                draft_dir=draft_dir))["token_ids"]
    for backend, ids in answers.items():
        texts = decoded(merged_dir, ids)
        same = sum(a == r for a, r in zip(texts, reference))
        out[f"{backend}_identical"] = f"{same}/{len(reference)}"
        if same != len(reference):
            first = next(i for i, (a, r) in enumerate(zip(texts, reference)) if a != r)
            reasons.append(f"serving parity: the {backend} engine's greedy answer differs from the reference on "
                           f"{len(reference) - same} of {len(reference)} questions (first: {texts[first]!r} vs "
                           f"{reference[first]!r})")
    return out, reasons


def merged_parity(cfg: LoopConfig) -> bool:
    """Whether serving parity starts an engine on the merged weights (`validation.merged_parity`)."""
    mode = cfg.validation.merged_parity
    return mode == "always" or (mode == "auto" and any(e.backend == "merged" for _, e in cfg.endpoints()))


async def _multi_lora(adapter_dir: str, conversations: list[list[dict]], max_tokens: int) -> list[list[int]]:
    from loop.cluster import engine_handle

    handle = engine_handle()
    ids = []
    for i, c in enumerate(conversations):
        gen = await handle.generate.remote(c, max_tokens=max_tokens, adapter_path=adapter_dir,
                                           request_id=f"parity-{i}")
        ids.append(gen.token_ids)
    return ids
