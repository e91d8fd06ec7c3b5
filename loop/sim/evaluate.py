"""How well one model version knows the simulated world, asked of the serving engine itself.

The same questions, the same greedy decoding, the same vLLM engine for every line of the demo: the
static snapshot (version 1, the base, never updated), the champion before and after a cycle. Asking
the engine directly keeps the cascade (which would answer unsure questions with the teacher) and the
rollout (which picks a version per user) out of the measurement; the gateway path is what the
traffic and canary stages exercise.
"""
from __future__ import annotations

from loop.sim.world import GENERAL_QUESTIONS, Fact, is_correct, states


class NoEngine(RuntimeError):
    """No multi-LoRA engine is running (a config whose endpoints all use the `merged` backend)."""


def engine_answers(questions: list[str], adapter_path: str | None, max_tokens: int, concurrency: int = 8) -> list[str]:
    """Greedy answers of the multi-LoRA engine (with `adapter_path`, or the base model without)."""
    import asyncio
    import uuid

    from ray import serve

    from serve_apps.gateway_app import ENGINE_APP

    status = serve.status().applications.get(ENGINE_APP)
    if status is None or status.status != "RUNNING":
        raise NoEngine(f"{ENGINE_APP} is not running: the demo's accuracy lines need a multi_lora endpoint")
    handle = serve.get_deployment_handle(ENGINE_APP, app_name=ENGINE_APP)

    run = uuid.uuid4().hex[:12]

    async def ask_all() -> list[str]:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, q: str) -> str:
            async with gate:
                gen = await handle.generate.remote([{"role": "user", "content": q}], max_tokens=max_tokens,
                                                   adapter_path=adapter_path, request_id=f"loop-eval-{run}-{i}")
                return gen.text

        return list(await asyncio.gather(*(one(i, q) for i, q in enumerate(questions))))

    return asyncio.run(ask_all())


def score_version(facts: list[Fact], adapter_path: str | None, max_tokens: int, concurrency: int = 8) -> dict:
    """Accuracy on the held-out phrasing of every current fact (`acc`) and on the general questions
    the base answers right (`regression_acc`), with a few answers to read."""
    questions = [f.heldout_question() for f in facts] + [q for q, _ in GENERAL_QUESTIONS]
    answers = engine_answers(questions, adapter_path, max_tokens, concurrency)
    facts_ok = [is_correct(f, a) for f, a in zip(facts, answers)]
    general_ok = [states(v, a) for (_, v), a in zip(GENERAL_QUESTIONS, answers[len(facts):])]
    return {"acc": sum(facts_ok) / max(1, len(facts)), "regression_acc": sum(general_ok) / len(general_ok),
            "samples": [{"q": q, "a": a} for q, a in zip(questions[:2], answers[:2])]}
