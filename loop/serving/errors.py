"""Errors in OpenAI's format: `{"error": {"message", "type", "param", "code"}}` with its HTTP status."""
from __future__ import annotations

from starlette.responses import JSONResponse


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
