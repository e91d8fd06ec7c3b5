"""What the gateway and the reference teacher send back in OpenAI's shape: completion bodies, their
choices and log-probabilities, and the events of a stream. Built here, so the gateway, the teacher
and the tests agree on one shape.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(tokens: list[dict] | None, top: int) -> dict | None:
    """The engine's per-token log-probabilities (Generation.logprobs) as a chat choice's `logprobs`,
    with the first `top` alternatives at each token, as vLLM's server gives them."""
    if tokens is None:
        return None
    return {"content": [{"token": t["token"], "logprob": t["logprob"], "bytes": _bytes(t["token"]),
                         "top_logprobs": [{"token": k, "logprob": v, "bytes": _bytes(k)} for k, v in t["top"][:top]]}
                        for t in tokens], "refusal": None}


def completion_logprobs(tokens: list[dict] | None, top: int, offset: int = 0) -> dict | None:
    """The same as a text completion's `logprobs`: tokens, their log-probabilities, the sampled one
    and `top` alternatives per token (vLLM's k + 1), and each token's offset in the text (from `offset`)."""
    if tokens is None:
        return None
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t["token"])
    return {"tokens": [t["token"] for t in tokens], "token_logprobs": [t["logprob"] for t in tokens],
            "top_logprobs": [dict(t["top"][:top + 1]) for t in tokens], "text_offset": offsets}


@dataclass
class Choice:
    """One choice of a response: its text, its tool calls (the text then what the model said beside
    them, often nothing), why it ended, and its log-probabilities in the route's shape."""
    text: str
    finish_reason: str = "stop"
    logprobs: dict | None = None
    tool_calls: list[dict] | None = None

    def message(self) -> dict:
        if self.tool_calls:
            return {"role": "assistant", "content": self.text or None, "tool_calls": self.tool_calls}
        return {"role": "assistant", "content": self.text}


def chat_completion_body(request_id: str, model: str, choices: list[Choice], prompt_tokens: int,
                         completion_tokens: int) -> dict:
    return {
        "id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "message": c.message(), "finish_reason": c.finish_reason, "logprobs": c.logprobs}
                    for i, c in enumerate(choices)],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def completion_body(request_id: str, model: str, choices: list[Choice], prompt_tokens: int,
                    completion_tokens: int) -> dict:
    return {
        "id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
        "choices": [{"index": i, "text": c.text, "finish_reason": c.finish_reason, "logprobs": c.logprobs}
                    for i, c in enumerate(choices)],
        "usage": _usage(prompt_tokens, completion_tokens),
    }


def sse_chunk(request_id: str, model: str, chat: bool, delta: str | None, finish_reason: str | None = None,
              usage: tuple[int, int] | None = None, index: int = 0, logprobs: dict | None = None,
              tool_calls: list[dict] | None = None) -> str:
    """One server-sent event of a streamed chat or text completion (of choice `index`; `tool_calls`
    whole, in one chunk)."""
    if usage is not None:
        choices = []
    elif chat:
        message = {"role": "assistant", "content": delta}
        if tool_calls:
            message = {"role": "assistant", "content": delta or None,
                       "tool_calls": [{"index": i, **call} for i, call in enumerate(tool_calls)]}
        choices = [{"index": index, "delta": {} if delta is None and not tool_calls else message,
                    "finish_reason": finish_reason, "logprobs": logprobs}]
    else:
        choices = [{"index": index, "text": delta or "", "finish_reason": finish_reason, "logprobs": logprobs}]
    body = {"id": request_id, "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()), "model": model, "choices": choices}
    if usage is not None:
        body["usage"] = _usage(*usage)
    return f"data: {json.dumps(body)}\n\n"


SSE_DONE = "data: [DONE]\n\n"
