"""The cascade's escalation: a request the student answered with too little confidence is answered
by the teacher instead, through the `openai` client (the gateway decides when; this asks).
"""
from __future__ import annotations

from loop.serving.protocol import ChatCompletionRequest


class Escalation:
    def __init__(self, teacher: dict):
        """`teacher`: {"base_url", "model", "api_key"?, "timeout_s"?} of an OpenAI-compatible endpoint."""
        self.teacher, self._client = teacher, None

    async def answer(self, req) -> str:
        """The teacher's greedy answer to the request (chat, or a text prompt as one user message),
        stopped where the request says, in the JSON shape it asks for (a teacher that refuses it
        fails the escalation, and the student's answer serves)."""
        import openai

        if self._client is None:
            t = self.teacher
            self._client = openai.AsyncOpenAI(base_url=t["base_url"], api_key=t.get("api_key") or "unused",
                                              timeout=t.get("timeout_s", 30), max_retries=1)
        if isinstance(req, ChatCompletionRequest):
            messages = [m.as_dict() for m in req.messages]
        else:
            messages = [{"role": "user", "content": req.prompt}]
        resp = await self._client.chat.completions.create(
            model=self.teacher["model"], messages=messages, max_tokens=req.token_limit, temperature=0,
            **({"stop": req.stop} if req.stop else {}), **_shape(req))
        return resp.choices[0].message.content or ""


def _shape(req) -> dict:
    fmt = getattr(req, "response_format", None)
    if fmt is None or fmt.type == "text":
        return {}
    return {"response_format": fmt.model_dump(by_alias=True, exclude_none=True)}
