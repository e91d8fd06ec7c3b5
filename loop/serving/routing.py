"""The gateway's routing core: which endpoint, variant and version answer a request, and the trace
record it starts. Pure functions of the request, the tenant's models and the rollouts: no Ray, no
engine, no HTTP server, so it is unit-tested alone (tests/test_routing_core.py).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field

from loop.serving.errors import BadRequest
from loop.serving.protocol import ChatCompletionRequest, parse_request


def assign_variant(rollout: dict, user: str) -> str:
    """Sticky split: a user's hash decides the arm, so one user sees one arm for the rollout's life."""
    weight = float(rollout.get("challenger_weight") or 0.0)
    if not rollout.get("challenger") or weight <= 0:
        return "champion"
    bucket = int(hashlib.sha256(f"{rollout.get('rollout_id', '')}/{user}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "challenger" if bucket < weight else "champion"


@dataclass
class Call:
    """One authenticated request on its way through the gateway."""
    request_id: str
    started: float
    model: str
    endpoint: str
    variant: str
    version: dict
    record: dict
    headers: dict = field(default_factory=dict)


def model_not_found(model: str) -> BadRequest:
    """Another tenant's model is reported exactly like a missing one: no existence leak."""
    return BadRequest(f"model '{model}' does not exist or you do not have access to it", param="model",
                      status=404, code="model_not_found")


def model_named(headers, model: str) -> str:
    """The `model` field, or the endpoint named by a `Host: model-<id>.<domain>` header."""
    if model:
        return model
    host = headers.get("host", "").split(":")[0]
    if host.startswith("model-") and "." in host:
        return host.split(".")[0]
    raise BadRequest("model: required (or send Host: model-<id>.<domain>)", param="model")


def route(headers, kind: type, body: bytes, *, request_id: str, started: float, tenant: str,
          models: dict[str, str], rollouts: dict[str, dict], client_request_id: str = "",
          tool_parser: str | None = None) -> tuple[Call, object]:
    """Parse `body` as `kind` and route it: `models` is the tenant's (`model-<id>` -> endpoint id),
    `rollouts` what every endpoint serves now, `tool_parser` the base model's tool-call parser (which
    tool_choice auto needs). Returns the call (variant, version, the trace record so far, the response
    headers) and the parsed request; refusals are `BadRequest`s."""
    req = parse_request(body, kind, {"tool_parser": tool_parser})
    model = model_named(headers, req.model)
    endpoint = models.get(model)
    if endpoint is None:
        raise model_not_found(model)
    rollout = rollouts.get(endpoint)
    if not rollout or not rollout.get("champion"):
        raise BadRequest(f"model '{model}' has no deployed version yet", status=503, code="not_deployed",
                         type_="server_error")
    user = headers.get("x-loop-user") or req.user or ""
    variant = assign_variant(rollout, user)
    version = rollout[variant]
    chat = kind is ChatCompletionRequest
    prompt = [m.as_dict() for m in req.messages] if chat else req.prompt
    # `ts` is set once here: a retried append is recognised as the same record.
    record = dict(request_id=request_id, tenant=tenant, endpoint=endpoint, variant=variant,
                  model_version=version["version"], adapter_digest=version.get("adapter_digest", ""),
                  checkpoint_digest=version.get("checkpoint_digest", ""),
                  training_run_id=version.get("training_run_id", ""),
                  deployed_at=version.get("deployed_at", ""), user=user, prompt=json.dumps(prompt),
                  client_request_id=client_request_id, ts=time.time(), tools=tools_asked(req) if chat else "")
    call = Call(request_id, started, model, endpoint, variant, version, record,
                {"x-model-version": version["version"], "x-variant": variant})
    return call, req


def choice_request_id(request_id: str, index: int) -> str:
    """The trace record's id of choice `index` of a request (n > 1): the response's own id for the
    first, `<id>-<index>` for the others; feedback may name each."""
    return request_id if index == 0 else f"{request_id}-{index}"


def tools_asked(req: ChatCompletionRequest) -> str:
    """The trace's `tools` of a chat request: the tools offered and tool_choice as JSON ("" when none are
    offered: no tools, or tool_choice none), so a record says what the model was shown (and the loop
    leaves a tool call out of its labels)."""
    if not req.offers_tools:
        return ""
    choice = req.tool_choice.model_dump() if hasattr(req.tool_choice, "model_dump") else req.tool_choice or "auto"
    return json.dumps({"tools": [t.model_dump(exclude_none=True) for t in req.tools], "tool_choice": choice,
                       "parallel_tool_calls": req.parallel_tool_calls})


def engine_args(call: Call, req, tool_parser: str | None = None) -> dict:
    """What the engine's `generate` takes for this call: the version's adapter unless the version has
    an engine of its own (a merged version), the request's sampling, its tools, and (tool_choice auto)
    the tool-call parser that reads its answer."""
    adapter = None if call.version.get("engine_app") else call.version.get("adapter_path")
    args = dict(max_tokens=req.token_limit, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                adapter_path=adapter, request_id=call.request_id)
    if sampling := req.sampling():  # only when set: an engine started by an earlier release takes none
        args["sampling"] = sampling
    if isinstance(req, ChatCompletionRequest):
        args["messages"] = [m.as_dict() for m in req.messages]
        if req.offers_tools:  # the chat template shows the model its tools
            args["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        if req.parses_tools and tool_parser:
            args["tool_parser"] = tool_parser
            if req.parallel_tool_calls is False:
                args["parallel_tool_calls"] = False
    else:
        args["prompt"] = req.prompt
    return args
