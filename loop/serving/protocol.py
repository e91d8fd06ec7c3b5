"""The requests of the OpenAI HTTP protocol the gateway and the reference teacher take.

Request validation gives one clear message naming the field; errors use OpenAI's error body
(`errors.py`). Tools (the functions offered, replayed calls, the schema `tool_choice: required`
decodes under) are `tools.py`; what goes back (bodies, log-probabilities, stream events) is
`responses.py`; the `x-request-id` a response carries is `request_id.py`.
"""
from __future__ import annotations

import json
import uuid
from typing import Literal

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from loop.serving.errors import BadRequest
from loop.serving.responses import chat_logprobs, completion_logprobs
from loop.serving.tools import MessageToolCall, NamedToolChoice, Tool, arguments_schema, tool_calls_schema

MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's bounds, and vLLM's default max_logprobs
MAX_COMPLETION_LOGPROBS = 5


class ChatMessage(BaseModel):
    """A message as OpenAI's chat API takes it; `content` a string or an array of text parts, joined
    by newlines as vLLM's own server joins them. An agent's turns replay too: an assistant message
    with the `tool_calls` it made (its content may be null), then a `tool` message per call with its
    result, naming the call by `tool_call_id`."""
    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | None = None
    name: str | None = Field(default=None, max_length=64)
    tool_calls: list[MessageToolCall] | None = Field(default=None, max_length=128)
    tool_call_id: str | None = Field(default=None, min_length=1, max_length=128)

    @model_validator(mode="before")
    @classmethod
    def _replayed_fields(cls, message):
        """An assistant message replayed from an OpenAI response carries `refusal: null`, `annotations:
        []` and the like: neutral, they ask nothing; set, they ask what this server does not do."""
        if isinstance(message, dict):
            for name in _REPLAYED.intersection(message):
                if not _neutral(name, message[name]):
                    raise ValueError(f"{name} {_NOT_YET}")
            message = {k: v for k, v in message.items() if k not in _REPLAYED}
        return message

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts(cls, content):
        if not isinstance(content, list):
            return content
        texts = []
        for i, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            if kind != "text":
                raise ValueError(f"part {i} is {kind!r}: this server takes text parts only, "
                                 '{"type": "text", "text": "..."}')
            if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                raise ValueError(f"part {i}: a text part is {{\"type\": \"text\", \"text\": a string}}, "
                                 f"nothing else (it has {sorted(part)})")
            texts.append(part["text"])
        return "\n".join(texts)

    @model_validator(mode="after")
    def _turn(self):
        if self.tool_calls and self.role != "assistant":
            raise ValueError("tool_calls: only an assistant message carries the tool calls it made")
        if (self.role == "tool") != (self.tool_call_id is not None):
            raise ValueError("tool_call_id: a tool message names the call it answers, and only a tool message does"
                             if self.role == "tool" else "tool_call_id: only a tool message names a call")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("content: required (only an assistant message with tool_calls may have none)")
        return self

    @property
    def is_tool_turn(self) -> bool:
        """A turn of a tool-using conversation (a call made, or its result)."""
        return self.role == "tool" or bool(self.tool_calls)

    def as_dict(self) -> dict:
        """The message as the chat template, the trace and the teacher take it (OpenAI's form: a tool
        call's arguments a JSON string; the engine decodes them for the template, as vLLM's server)."""
        out = self.model_dump(exclude_none=True)
        if self.tool_calls == []:
            out.pop("tool_calls")
        return out


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


_NOT_YET = "is not supported by this server yet (README: the OpenAI parameters)"
_REPLAYED = {"refusal", "annotations", "function_call", "audio"}
REFUSED = {
    "tools": "is not supported on text completions: send tools to /v1/chat/completions",
    "tool_choice": "is not supported on text completions",
    "parallel_tool_calls": "is not supported on text completions",
    "functions": "is deprecated by OpenAI and not supported: send tools", "function_call":
        "is deprecated by OpenAI and not supported: send tool_choice",
    "echo": _NOT_YET, "best_of": _NOT_YET, "suffix": _NOT_YET,
    "audio": "is not supported: the student is a text model", "modalities": "is not supported: the student is a text model",
    "prediction": _NOT_YET, "reasoning_effort": "is not supported: the student is not a reasoning model",
    "verbosity": _NOT_YET, "web_search_options": "is not supported: the server has no web search",
    "store": "is not supported: every request is traced for the loop, by design",
    "metadata": _NOT_YET, "service_tier": "is not supported: one tier serves every request",
    "prompt_cache_key": _NOT_YET, "safety_identifier": _NOT_YET,
}
"""OpenAI request parameters this server does not honour, and why: a request that sets one (to
anything but its neutral value) is refused with a 400 naming it, never served as if it were honoured.
A route whose request model has the field (chat's tools) takes it instead."""


_NEUTRAL = {"modalities": [["text"]], "service_tier": ["auto", "default"], "tool_choice": ["none"], "best_of": [1]}


def _neutral(name: str, value) -> bool:
    """Whether `value` asks nothing of the server (absent, off, empty, or the default behaviour), so
    it can be ignored honestly. `parallel_tool_calls` means nothing without `tools`, refused themselves."""
    if name == "parallel_tool_calls" or value is None or value is False or value == [] or value == {}:
        return True
    return any(value == v and type(value) is type(v) for v in _NEUTRAL.get(name, []))


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(default="", max_length=128)
    """`model-<endpoint>`; may be empty when the Host header names the endpoint."""
    max_tokens: int | None = Field(default=None, ge=1, le=4096)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    stop: list[str] | None = None
    """A string or up to 4: the answer ends before the first of them (finish_reason `stop`)."""
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = Field(default=None, max_length=256)
    seed: int | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    """Choices sampled for the prompt (vLLM's n): each is traced as its own record."""
    logit_bias: dict[str, float] | None = None
    """Token id (as a string, OpenAI's form) -> bias added to its logit, -100..100."""

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, bias):
        for token, value in (bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"key {token!r} is not a token id: keys are token ids as strings, e.g. \"50256\"")
            if not -100 <= value <= 100:
                raise ValueError(f"bias {value} for token {token} is outside -100..100")
        return bias

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, stop):
        stops = [stop] if isinstance(stop, str) else stop
        if stops is not None and not (isinstance(stops, list) and len(stops) <= 4
                                      and all(isinstance(s, str) and s for s in stops)):
            raise ValueError("a string or a list of up to 4 non-empty strings")
        return stops

    @property
    def logprob_count(self) -> int | None:
        """vLLM's `logprobs`: alternatives per token (None: no log-probabilities asked)."""
        return None

    def structured(self) -> dict | None:
        """vLLM's StructuredOutputsParams fields the request asks for (None: free text)."""
        return None

    def format_logprobs(self, tokens: list[dict] | None, offset: int = 0) -> dict | None:
        """A choice's `logprobs` in this route's shape, from the engine's (None when not asked)."""
        return None

    def sampling(self) -> dict:
        """What vLLM's SamplingParams takes beyond length, temperature, top_p and seed: only what the
        request set (an empty dict for a request that set none)."""
        out = {"stop": self.stop, "presence_penalty": self.presence_penalty,
               "frequency_penalty": self.frequency_penalty, "n": self.n if self.n > 1 else None,
               "logit_bias": {int(k): v for k, v in self.logit_bias.items()} if self.logit_bias else None,
               "structured_outputs": self.structured()}
        out = {k: v for k, v in out.items() if v}
        if self.logprob_count is not None:  # 0 is asked too: the sampled token's own log-probability
            out["logprobs"] = self.logprob_count
        return out


def cut_at_stop(text: str, stops: list[str] | None) -> str:
    """`text` up to the first of `stops` (the stop string itself left out), as vLLM stops."""
    cuts = [i for i in (text.find(s) for s in stops or []) if i >= 0]
    return text[:min(cuts)] if cuts else text


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    name: str = Field(max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text` (free), `json_object` (any JSON object) or `json_schema` (JSON valid against the schema),
    enforced while decoding by vLLM's structured outputs."""
    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only with it")
        return self


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=4096)
    logprobs: bool | None = None
    """Return the sampled tokens' log-probabilities (choices[].logprobs.content)."""
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    """With logprobs: the k likeliest alternatives at each token."""
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(default=None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """`required` or a named function: decoded under structured outputs as vLLM's server does. `auto`
    (OpenAI's default with tools): the model answers or calls, its calls read by the base model's
    tool-call parser (`student.tool_call_parser`); refused on a server that has none."""
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _tools_asked(self, info: ValidationInfo):
        tools, choice = self.tools or [], self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in {t.function.name for t in tools}:
            raise BadRequest(f"tool_choice: names the function {choice.function.name!r}, which is not in tools",
                             param="tool_choice")
        if choice in ("required", "auto") and not tools:
            raise BadRequest(f"tool_choice: {choice!r} needs tools", param="tool_choice")
        if tools and choice in (None, "auto") and not (info.context or {}).get("tool_parser"):
            raise BadRequest("tool_choice: 'auto' (the default with tools) needs a tool-call parser for the base "
                             "model (student.tool_call_parser in the server's config, e.g. hermes for Qwen2.5), "
                             "which this server does not have; send tool_choice 'required' or "
                             '{"type": "function", "function": {"name": ...}}, or "none"', param="tool_choice",
                             code="unsupported_parameter")
        if choice == "required":
            tool_calls_schema(tools, self.parallel_tool_calls)  # a refusal (conflicting $defs) at once
        if self.calls_tools and self.response_format and self.response_format.type != "text":
            raise BadRequest("response_format: a tool call's arguments are already JSON; send one of "
                             "response_format and tool_choice", param="response_format")
        return self

    @property
    def offers_tools(self) -> bool:
        """The model is shown tools it may (auto) or must (required, named) call."""
        return bool(self.tools) and self.tool_choice != "none"

    @property
    def parses_tools(self) -> bool:
        """The model decides whether to call (tool_choice auto): its answer is read by the tool-call parser."""
        return self.offers_tools and self.tool_choice in (None, "auto")

    @property
    def uses_tools(self) -> bool:
        """A request of a tool-using conversation (tools offered, or a tool turn in its messages): answered
        by the student only (never escalated), and neither labelled nor graded (loop/traces/log.py's
        tool_traffic reads the same from its trace record). Tools with tool_choice none are not offered:
        a plain request, as vLLM's server with --exclude-tools-when-tool-choice-none."""
        return self.offers_tools or any(m.is_tool_turn for m in self.messages)

    @property
    def calls_tools(self) -> bool:
        """The answer is a tool call (tool_choice required or named), never free text."""
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    def tool_calls(self, text: str) -> list[dict] | None:
        """The answer decoded for a tool call as OpenAI's `tool_calls` (None when it is not one, or was
        cut short by max_tokens before its JSON closed)."""
        if not self.calls_tools:
            return None
        try:
            decoded = json.loads(text)
        except json.JSONDecodeError:
            return None
        if isinstance(self.tool_choice, NamedToolChoice):
            calls = [(self.tool_choice.function.name, text)]
        else:
            calls = [(c["name"], json.dumps(c["parameters"])) for c in decoded]
        return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                 "function": {"name": name, "arguments": arguments}} for name, arguments in calls]

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, top, info):
        if top and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return top

    @property
    def token_limit(self) -> int:
        return self.max_completion_tokens or self.max_tokens or 256

    @property
    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def format_logprobs(self, tokens: list[dict] | None, offset: int = 0) -> dict | None:
        return chat_logprobs(tokens, self.top_logprobs or 0) if self.logprobs else None

    def structured(self) -> dict | None:
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            named = next(t for t in self.tools if t.function.name == self.tool_choice.function.name)
            return {"json": arguments_schema(named.function.parameters)}
        if self.calls_tools:
            return {"json": tool_calls_schema(self.tools, self.parallel_tool_calls)}
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return {"json_object": True}
        return {"json": fmt.json_schema.schema_}


class CompletionRequest(_Sampling):
    prompt: str = Field(min_length=1)
    logprobs: int | None = Field(default=None, ge=0, le=MAX_COMPLETION_LOGPROBS)
    """The k likeliest alternatives at each token, beside the sampled one (choices[].logprobs)."""

    @property
    def token_limit(self) -> int:
        return self.max_tokens or 16

    @property
    def logprob_count(self) -> int | None:
        return self.logprobs

    def format_logprobs(self, tokens: list[dict] | None, offset: int = 0) -> dict | None:
        return None if self.logprobs is None else completion_logprobs(tokens, self.logprobs, offset)


def json_body(body: bytes, empty: dict | None = None) -> dict:
    """A request body as a JSON object (`empty` stands for a body of no bytes, where a route allows it):
    over MAX_BODY_BYTES a 413, not JSON (or not UTF-8) or not an object a 400, as every route answers."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}", status=413,
                         code="request_too_large")
    if not body and empty is not None:
        return empty
    try:
        raw = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise BadRequest("request body is nested too deeply") from None
    if not isinstance(raw, dict):
        raise BadRequest("request body must be a JSON object")
    return raw


def parse_request(body: bytes, model: type[BaseModel], context: dict | None = None):
    """Validate a JSON body into `model`; any problem is a BadRequest naming the field. `context`: what
    the server can do that a request may ask for (`tool_parser`: the base model's tool-call parser)."""
    raw = json_body(body)
    refused = {name: why for name, why in REFUSED.items() if name not in model.model_fields}
    for name, why in refused.items():
        if name in raw and not _neutral(name, raw[name]):
            raise BadRequest(f"{name} {why}; remove it from the request", param=name, code="unsupported_parameter")
    raw = {k: v for k, v in raw.items() if k not in refused}  # those left are neutral: nothing asked
    try:
        return model.model_validate(raw, context=context)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        if err["type"] == "extra_forbidden":
            raise BadRequest(f"{param}: not a parameter this route takes (README: the OpenAI parameters); remove it",
                             param=param, code="unknown_parameter") from None
        raise BadRequest(f"{param}: {err['msg']}" if param else err["msg"], param=param) from None


def parse_chat_request(body: bytes) -> ChatCompletionRequest:
    return parse_request(body, ChatCompletionRequest)
