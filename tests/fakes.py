"""Fakes shared by the gateway tests: replicas get them by value (`register_pickle_by_value`)."""
import asyncio
import time
from dataclasses import dataclass

from loop.serving.engine import Generation
from loop.serving.protocol import cut_at_stop


@dataclass
class FakeEngine:
    """Echoes which adapter answered, so the test sees routing in the completion text."""

    async def generate(self, messages=None, *, prompt=None, max_tokens, temperature=0.0, top_p=1.0, seed=None,
                       adapter_path=None, request_id="", confidence=False, sampling=None):
        text = messages[-1]["content"] if messages else prompt
        if text == "boom":
            raise RuntimeError("engine died")
        if text == "long":
            raise ValueError("prompt is 999 tokens; this endpoint's context is 256")
        if text == "slow":
            await asyncio.sleep(5)
        # Questions (text ending in "?") come back with low confidence, to exercise the cascade.
        answer = cut_at_stop(f"adapter={adapter_path}", (sampling or {}).get("stop"))
        return Generation(text=answer, prompt_tokens=3, completion_tokens=2, ttft_ms=1.0,
                          finish_reason="stop", mean_logprob=-5.0 if text.endswith("?") else -0.1)

    async def generate_stream(self, messages=None, *, prompt=None, max_tokens, temperature=0.0, top_p=1.0,
                              seed=None, adapter_path=None, request_id="", sampling=None):
        """Yields `max_tokens` one-token deltas 'tok0 ', 'tok1 ', ... (0.2 s apart for the prompt 'slow';
        'boom' and 'long' fail before the first, as the engine does; 'boom-late' after the first)."""
        text = messages[-1]["content"] if messages else prompt
        if text in ("boom", "long"):
            await self.generate(messages, prompt=prompt, max_tokens=max_tokens)
        for i in range(max_tokens):
            if text == "slow":
                await asyncio.sleep(0.2)
            if text == "boom-late" and i == 1:
                raise RuntimeError("engine died mid-answer")
            yield Generation(text=f"tok{i} ", prompt_tokens=3, completion_tokens=1, ttft_ms=1.0,
                             finish_reason="length" if i == max_tokens - 1 else "")


def serve_gateway(name: str, route: str, rollouts: dict, *bind_args) -> None:
    """A gateway app (the real Gateway class) under `route`, bound to `bind_args`; waits until RUNNING."""
    from ray import serve

    from serve_apps.gateway_app import ingress_gateway

    app = serve.deployment(ingress_gateway(), name=name, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
                           user_config={"endpoints": rollouts}).bind(*bind_args)
    serve.run(app, name=name, route_prefix=route, blocking=False)
    for _ in range(120):
        if serve.status().applications[name].status == "RUNNING":
            return
        time.sleep(0.5)
    raise TimeoutError(f"test gateway {name} did not start")


def fake_engine():
    from ray import serve

    return serve.deployment(FakeEngine, ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256).bind()
