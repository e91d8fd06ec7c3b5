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


def engine_answers(requests: list[tuple[str, str | None]], max_tokens: int, concurrency: int = 8) -> list[str]:
    """Greedy answers of the multi-LoRA engine to (question, adapter path or None for the base) pairs,
    `concurrency` at a time, so several versions' questions share the engine's batches."""
    import asyncio
    import uuid

    from loop.cluster import ENGINE_APP, engine_handle, running

    if not running(ENGINE_APP):
        raise NoEngine(f"{ENGINE_APP} is not running: the demo's accuracy lines need a multi_lora endpoint")
    handle = engine_handle()
    run = uuid.uuid4().hex[:12]

    async def ask_all() -> list[str]:
        gate = asyncio.Semaphore(concurrency)

        async def one(i: int, q: str, adapter: str | None) -> str:
            async with gate:
                gen = await handle.generate.remote([{"role": "user", "content": q}], max_tokens=max_tokens,
                                                   adapter_path=adapter, request_id=f"loop-eval-{run}-{i}")
                return gen.text

        return list(await asyncio.gather(*(one(i, q, a) for i, (q, a) in enumerate(requests))))

    return asyncio.run(ask_all())


def score_versions(facts: list[Fact], adapters: dict[str, str | None], max_tokens: int, concurrency: int = 8,
                   general: set[str] | None = None) -> dict[str, dict]:
    """Per named version (its adapter path, None for the base): accuracy on the held-out phrasing of
    every current fact (`acc`) and, for the names in `general` (default: all), on the general
    questions the base answers right (`regression_acc`), with a few answers to read."""
    general = set(adapters) if general is None else general
    plan = []
    for name, adapter in adapters.items():
        plan += [(name, "fact", f.heldout_question(), adapter) for f in facts]
        if name in general:
            plan += [(name, "general", q, adapter) for q, _ in GENERAL_QUESTIONS]
    # One version at a time: a run that asked them together once scored the static snapshot above what
    # it can know. Shared batches did not reproduce it (benchmarks/reliability/api.py: mixed_batches), but
    # keeping the versions apart costs a few seconds and rules it out.
    answers = []
    for name in adapters:
        mine = [(q, a) for n, _, q, a in plan if n == name]
        answers += engine_answers(mine, max_tokens, concurrency)
    plan = [p for name in adapters for p in plan if p[0] == name]
    out = {}
    for name in adapters:
        got = [(kind, q, a) for (n, kind, q, _), a in zip(plan, answers) if n == name]
        fact_answers = [a for kind, _, a in got if kind == "fact"]
        general_answers = [a for kind, _, a in got if kind == "general"]
        out[name] = {"acc": sum(is_correct(f, a) for f, a in zip(facts, fact_answers)) / max(1, len(facts)),
                     "regression_acc": (sum(states(v, a) for (_, v), a in zip(GENERAL_QUESTIONS, general_answers))
                                        / len(GENERAL_QUESTIONS)) if general_answers else float("nan"),
                     "samples": [{"q": q, "a": a} for _, q, a in got[:2]]}
    return out
