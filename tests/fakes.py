"""Fakes shared by the gateway tests: replicas get them by value (`register_pickle_by_value`)."""
import asyncio
import time
from dataclasses import dataclass

from loop.serving.engine import EngineRequestError, Generation
from loop.serving.protocol import cut_at_stop


@dataclass
class FakeEngine:
    """Echoes which adapter answered, so the test sees routing in the completion text; with n > 1
    choice i says `#i` after it (and of a question, only the even choices are unsure); asked for
    log-probabilities, each token's is -0.5 (top: itself, "x"). Given a tool-call parser (tool_choice
    auto), a question about the weather is answered with a call, in Hermes' tags, read as the engine
    reads it (Generation.tool_calls, the words before it its content)."""

    async def generate(self, messages=None, *, prompt=None, max_tokens, temperature=0.0, top_p=1.0, seed=None,
                       adapter_path=None, request_id="", confidence=False, sampling=None, tools=None,
                       tool_parser=None, parallel_tool_calls=True):
        text = messages[-1]["content"] if messages else prompt
        if tool_parser and "weather" in text:
            call = {"id": f"chatcmpl-tool-{request_id[-8:]}", "type": "function",
                    "function": {"name": tools[0]["function"]["name"], "arguments": '{"city": "Oslo"}'}}
            raw = 'Checking. <tool_call>{"name": "%s", "arguments": {"city": "Oslo"}}</tool_call>' % call["function"]["name"]
            return Generation(text=raw, prompt_tokens=5, completion_tokens=20, ttft_ms=1.0, finish_reason="stop",
                              mean_logprob=-5.0, tool_calls=[call], content="Checking. ")
        if text == "boom":
            raise RuntimeError("engine died")
        if text == "long":
            raise EngineRequestError("prompt is 999 tokens; this endpoint's context is 256", param="messages",
                                     code="context_length_exceeded")
        if text == "slow":
            await asyncio.sleep(5)
        # Questions (text ending in "?") come back with low confidence, to exercise the cascade.
        sampling = sampling or {}
        gens = []
        for i in range(sampling.get("n", 1)):
            answer = cut_at_stop(f"adapter={adapter_path}" + (f" #{i}" if i else ""), sampling.get("stop"))
            gens.append(Generation(text=answer, prompt_tokens=3, completion_tokens=2 + i, ttft_ms=1.0, index=i,
                                   finish_reason="stop",
                                   mean_logprob=-5.0 if text.endswith("?") and i % 2 == 0 else -0.1,
                                   logprobs=_logprobs(answer.split(" "), sampling)))
        gens[0].others = gens[1:]
        return gens[0]

    async def generate_stream(self, messages=None, *, prompt=None, max_tokens, temperature=0.0, top_p=1.0,
                              seed=None, adapter_path=None, request_id="", sampling=None, tools=None):
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
            for choice in range((sampling or {}).get("n", 1)):  # with n > 1 the choices interleave
                yield Generation(text=f"tok{i} ", prompt_tokens=3, completion_tokens=1, ttft_ms=1.0, index=choice,
                                 finish_reason="length" if i == max_tokens - 1 else "",
                                 logprobs=_logprobs([f"tok{i} "], sampling or {}))


def _logprobs(tokens: list[str], sampling: dict) -> list[dict] | None:
    if sampling.get("logprobs") is None:
        return None
    return [{"token": t, "logprob": -0.5, "top": [[t, -0.5], ["x", -1.0]]} for t in tokens]


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
