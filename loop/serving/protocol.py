"""The slice of the OpenAI HTTP protocol the gateway and the reference teacher speak.

Request validation gives one clear message naming the field; errors use OpenAI's error body.
"""
from __future__ import annotations

import time
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.responses import JSONResponse


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "developer"]
    content: str


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=128)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stream: bool = False
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = None

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256


def error_response(status: int, message: str, *, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None,
                   headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None, status: int = 400, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.code, self.type_ = message, param, status, code, type_

    def response(self, headers: dict | None = None) -> JSONResponse:
        return error_response(self.status, self.message, type_=self.type_, param=self.param, code=self.code,
                              headers=headers)


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    import json

    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise BadRequest("request body must be a JSON object")
    try:
        req = ChatCompletionRequest.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"])
        raise BadRequest(f"{param}: {err['msg']}", param=param) from None
    if req.stream:
        raise BadRequest("stream: true is not supported yet by this endpoint", param="stream")
    return req


def chat_completion_body(request_id: str, model: str, text: str, prompt_tokens: int,
                         completion_tokens: int, finish_reason: str = "stop") -> dict:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": finish_reason, "logprobs": None}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                  "total_tokens": prompt_tokens + completion_tokens},
    }
