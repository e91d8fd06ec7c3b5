"""The OpenAI-compatible gateway: the HTTP routes of chat and text completions, feedback, models and
the admin actions, each answered and traced.

A plain class behind a FastAPI app that Ray Serve mounts (`serve_apps/gateway_app.py` applies
`serve.ingress(api)` and `serve.deployment`). Its rooms: who is calling (`auth.py`), which variant
answers (`routing.py`, the routing core, tested without a cluster), the teacher's escalation
(`cascade.py`), the metrics (`metrics.py`), feedback's parsing and ownership (`feedback.py`), the
request id (`request_id.ServerRequestId`). The engine and the trace log are handles passed in, so the
routes are tested with a fake engine. Rollouts come from a RolloutStore actor, read on the request
path at most every POLL_S (or, without one, from Serve's `user_config`): a new version or weight is
live without restarting this replica or the engine.
Every request, answered or refused after authentication, becomes exactly one trace record, under
the gateway's own request id; feedback may name only the caller's own requests.
"""
from __future__ import annotations

import asyncio
import json
import os
import time

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, StreamingResponse

from loop.serving.auth import require_admin, tenant_of
from loop.serving.cascade import Escalation
from loop.serving.engine import EngineRequestError
from loop.serving.feedback import RequestOwners, log_holds_request, not_found, parse_feedback
from loop.serving.errors import BadRequest, error_response
from loop.serving.protocol import ChatCompletionRequest, CompletionRequest, json_body
from loop.serving.request_id import REQUEST_ID_HEADER, ServerRequestId
from loop.serving.responses import SSE_DONE, Choice, chat_completion_body, completion_body, sse_chunk
from loop.serving.rollouts import POLL_S
from loop.serving.routing import Call, choice_request_id, engine_args, model_not_found, route

CLIENT_CLOSED = 499  # a request whose client hung up before its answer was delivered (nginx's code)

api = FastAPI(title="continual-loop gateway", version="0.1")
api.add_middleware(ServerRequestId)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """A route that does not exist (404) or a method it does not take (405), in OpenAI's error shape."""
    return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}",
                          code="not_found" if exc.status_code == 404 else None, headers=exc.headers)


async def _after(first: str, events):
    """A stream whose first event was already read, then the rest; closing it closes `events`."""
    try:
        yield first
        async for event in events:
            yield event
    finally:
        await events.aclose()


class Gateway:
    tool_parser: str | None = None
    """The base model's vLLM tool-call parser (none: tool_choice auto is refused)."""

    def __init__(self, engine, trace_log, tenants: dict[str, dict], admin_key_hash: str | None = None,
                 cascade: dict[str, float] | None = None, teacher: dict | None = None, rollout_store=None,
                 controller=None, tool_parser: str | None = None, engine_handles=None):
        """`engine`: the multi-LoRA engine's handle (a version with an `engine_app` is served by that
        app's engine instead, whose handle is `engine_handles(app)`: loop.cluster.engine_handle).
        `tenants`: tenant id -> {"api_key_hashes": [...], "endpoints": [ids]}.
        `cascade`: endpoint id -> minimum mean token log-probability before escalating to `teacher`
        ({"base_url", "model", "api_key", "timeout_s"}), reached with the `openai` client.
        `controller`: the RolloutController actor that carries out the admin routes. `tool_parser`: the
        base model's vLLM tool-call parser (student.tool_call_parser), which `tool_choice: auto` needs."""
        from loop.serving.metrics import GatewayMetrics

        self.engine, self.trace_log, self.controller, self._engines = engine, trace_log, controller, {}
        self.engine_handles = engine_handles
        self.cascade, self.teacher = dict(cascade or {}), teacher
        self.escalation = Escalation(teacher) if teacher else None
        self.key_to_tenant = {h: t for t, spec in tenants.items() for h in spec["api_key_hashes"]}
        self.tenant_models = {t: {f"model-{e}": e for e in spec["endpoints"]} for t, spec in tenants.items()}
        self.admin_key_hash, self.tool_parser = admin_key_hash, tool_parser
        self.rollouts: dict[str, dict] = {}
        self.rollout_store, self._rollout_version, self._checked = rollout_store, -1, 0.0
        self.metrics = GatewayMetrics()
        self.owners = RequestOwners()
        self.started_at = time.time()

    def reconfigure(self, config: dict) -> None:
        self.rollouts = dict(config.get("endpoints", {}))

    async def _current_rollouts(self) -> dict:
        now = time.monotonic()
        if self.rollout_store is not None and now - self._checked >= POLL_S:
            self._checked = now
            try:
                changed = await self.rollout_store.get.remote(self._rollout_version)
            except Exception:  # noqa: BLE001 - store unreachable: keep serving the last known rollouts
                changed = None
            # Version 0 is a store that (re)started empty: keep serving what we have until it is set.
            if changed is not None and changed[0] > 0:
                self._rollout_version, self.rollouts = changed
        return self.rollouts

    # --- request preparation ---------------------------------------------------------------
    def _tenant(self, request: Request) -> str:
        return tenant_of(request.headers, self.key_to_tenant)

    async def _prepare(self, request: Request, kind: type) -> tuple[Call, object]:
        request_id = request.state.request_id  # the gateway's own (ServerRequestId)
        # The id the request arrived with: the client's, or, when it sent none, the one Ray Serve's
        # proxy gave it (Serve's logs name the request by it).
        client_request_id = request.headers.get(REQUEST_ID_HEADER, "")[:128]
        started = time.perf_counter()
        tenant = self._tenant(request)
        await self._current_rollouts()
        try:
            return self._route(request, kind, request_id, started, tenant, await request.body(), client_request_id)
        except BadRequest as e:
            # A refused request of a known tenant is traced too (nothing about it is dropped).
            e.record = dict(request_id=request_id, tenant=tenant, endpoint="", variant="", model_version="",
                            status=e.status, error=e.message[:500], client_request_id=client_request_id,
                            ts=time.time(), latency_ms=(time.perf_counter() - started) * 1000)
            raise

    def _route(self, request: Request, kind: type, request_id: str, started: float, tenant: str,
               body: bytes, client_request_id: str = "") -> tuple[Call, object]:
        return route(request.headers, kind, body, request_id=request_id, started=started, tenant=tenant,
                     models=self.tenant_models[tenant], rollouts=self.rollouts, client_request_id=client_request_id,
                     tool_parser=self.tool_parser)

    def _engine(self, version: dict):
        """The engine that serves `version`: its own merged engine app, or the multi-LoRA engine."""
        app = version.get("engine_app")
        if not app:
            return self.engine
        if app not in self._engines:
            if self.engine_handles is None:
                raise RuntimeError(f"a version is served by engine app {app!r}: this gateway has no engine_handles")
            self._engines[app] = self.engine_handles(app)
        return self._engines[app]

    async def _trace(self, call: Call, status: int = 200, error: str = "", choices: list[dict] | None = None,
                     **fields) -> None:
        """The request's trace record (`fields`), or one record per choice (`choices`: each choice's own
        fields, under `choice_request_id`; nothing of one choice leaks into another's record)."""
        base = {**call.record, "status": status, "latency_ms": (time.perf_counter() - call.started) * 1000}
        records = [{**base, "error": error, **c} for c in (choices or [fields])]
        for i, r in enumerate(records):
            r.update(error=r["error"][:500], request_id=choice_request_id(call.request_id, i))
        call.record.update(records[0])
        # Acknowledge only what is durable: the records are in the write-ahead log before we answer.
        await self.trace_log.append.remote(records)
        for r in records:
            self.owners.add(r["tenant"], r["request_id"])  # before the answer: feedback may follow at once
        # One request, one observation (its choices' tokens summed).
        self.metrics.observe(call.endpoint, call.variant, status, records[0].get("prompt_tokens", 0),
                             sum(r.get("completion_tokens", 0) for r in records), base["latency_ms"],
                             any(r.get("escalated") for r in records))

    async def _failed(self, call: Call, req, e: Exception) -> JSONResponse:
        return (await self._refusal(call, req, e)).response(headers=call.headers)

    async def _refusal(self, call: Call, req, e: Exception) -> BadRequest:
        """A failed generation, traced, as the error its client gets: what the engine refused as the
        caller's to fix (a prompt over the context, a token id outside the vocabulary, a schema it
        cannot compile) is a 400 naming the parameter; anything else the engine's (503, retry)."""
        cause = getattr(e, "cause", None) or e  # a Ray task error wraps the engine's exception
        callers = isinstance(cause, EngineRequestError)
        await self._trace(call, status=400 if callers else 503, error=f"{type(cause).__name__}: {cause}")
        if callers:
            param = cause.param
            if param == "structured_outputs":  # the request's schema: its tools' or its response_format's
                param = "tools" if isinstance(req, ChatCompletionRequest) and req.calls_tools else "response_format"
            return BadRequest(str(cause), param=param, code=cause.code)
        call.headers["retry-after"] = "1"
        return BadRequest("the engine failed; retry shortly", status=503, type_="server_error")

    # --- routes -------------------------------------------------------------------------------
    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        return await self._complete(request, ChatCompletionRequest)

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        return await self._complete(request, CompletionRequest)

    async def _complete(self, request: Request, kind: type):
        try:
            call, req = await self._prepare(request, kind)
        except BadRequest as e:
            if getattr(e, "record", None):
                await self.trace_log.append.remote([e.record])
                self.owners.add(e.record["tenant"], e.record["request_id"])
            return e.response()
        # A tool-using conversation is answered by the student (the teacher is not asked to call tools);
        # an answer that may be a call is read whole (a stream of it is replayed).
        chat = isinstance(req, ChatCompletionRequest)
        threshold = self.cascade.get(call.endpoint) if self.teacher and not (chat and req.uses_tools) else None
        if req.stream and threshold is None and not (chat and req.offers_tools):
            events = self._stream(call, req)
            try:  # the first event before the headers: a refusal or a failure up to it is a real 4xx / 5xx
                first = await events.__anext__()
            except BadRequest as e:
                return e.response(headers=call.headers)
            return StreamingResponse(_after(first, events), media_type="text/event-stream", headers=call.headers)
        try:
            gen = await self._engine(call.version).generate.remote(**engine_args(call, req, self.tool_parser),
                                                                  confidence=threshold is not None)
            gens = [gen, *gen.others]
            answers = [dict(completion=g.text, prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens,
                            ttft_ms=g.ttft_ms, confidence=g.mean_logprob or 0.0) for g in gens]
            if threshold is not None:
                await self._escalate(call, req, gens, answers, threshold)
        except asyncio.CancelledError:
            # Serve's proxy cancels the request when its client hangs up: nothing was delivered, and
            # the record says so (never a 200). Shielded, as the stream's is.
            try:
                await asyncio.shield(self._trace(call, status=CLIENT_CLOSED, error="client closed the request "
                                                                                    "before the answer"))
            except Exception:  # noqa: BLE001 - the trace log is unreachable: the cancellation still goes on
                pass
            raise
        except Exception as e:  # noqa: BLE001 - every failure is traced and answered, never dropped
            return await self._failed(call, req, e)
        await self._trace(call, choices=answers)
        # An escalated answer is the teacher's: the student's log-probabilities are not its.
        choices = [self._choice(req, g, a) for g, a in zip(gens, answers)]
        usage = gen.prompt_tokens, sum(g.completion_tokens for g in gens)
        if req.stream:
            # A cascade endpoint judges the whole answer before the caller sees any of it, so its
            # stream is the final answer (the student's or the teacher's) in one chunk per choice;
            # so is a tool call's (its arguments decoded whole).
            return StreamingResponse(self._replay(call, req, choices, usage), media_type="text/event-stream",
                                     headers=call.headers)
        build = chat_completion_body if kind is ChatCompletionRequest else completion_body
        return JSONResponse(build(call.request_id, call.model, choices, *usage), headers=call.headers)

    @staticmethod
    def _choice(req, gen, answer: dict) -> Choice:
        """A choice as the response carries it: an escalated answer is the teacher's (the student's
        log-probabilities are not its); a forced tool call's JSON is its `tool_calls`, an auto one's are
        what the tool-call parser read (with what the model said beside them)."""
        logprobs = None if answer.get("escalated") else req.format_logprobs(gen.logprobs)
        if not isinstance(req, ChatCompletionRequest) or not req.offers_tools:
            return Choice(answer["completion"], gen.finish_reason, logprobs)
        if req.parses_tools:
            if gen.tool_calls and not answer.get("escalated"):
                return Choice(gen.content or "", "tool_calls", logprobs, gen.tool_calls)
            return Choice(answer["completion"], gen.finish_reason, logprobs)
        calls = req.tool_calls(answer["completion"])
        # As OpenAI's and vLLM's servers: `tool_calls` for tool_choice required, `stop` for a named function.
        finish = "tool_calls" if calls and req.tool_choice == "required" and gen.finish_reason == "stop" else \
            gen.finish_reason
        return Choice("" if calls else answer["completion"], finish, logprobs, calls)

    async def _escalate(self, call: Call, req, gens: list, answers: list[dict], threshold: float) -> None:
        """The cascade: each choice less confident than `threshold` becomes the teacher's answer (asked
        once); the student's is kept beside it. A failed escalation keeps the student's, traced."""
        low = [i for i, g in enumerate(gens) if g.mean_logprob is not None and g.mean_logprob < threshold]
        if not low:
            return
        try:
            text = await self.escalation.answer(req)
        except Exception as e:  # noqa: BLE001 - the student's answer still serves; the miss is traced
            for i in low:
                answers[i]["error"] = f"escalation failed: {type(e).__name__}: {e}"
            return
        for i in low:
            answers[i].update(completion=text, escalated=True, student_completion=gens[i].text)
        call.headers["x-loop-escalated"] = "true"

    @staticmethod
    async def _replay(call: Call, req, choices: list[Choice], usage: tuple[int, int]):
        chat = isinstance(req, ChatCompletionRequest)
        for i, c in enumerate(choices):
            yield sse_chunk(call.request_id, call.model, chat, c.text, finish_reason=c.finish_reason, index=i,
                            logprobs=c.logprobs, tool_calls=c.tool_calls)
        if req.stream_options and req.stream_options.include_usage:
            yield sse_chunk(call.request_id, call.model, chat, None, usage=usage)
        yield SSE_DONE

    async def _stream(self, call: Call, req):
        chat = isinstance(req, ChatCompletionRequest)
        # Per choice: its deltas, its token count, the text offset of its next token (by the tokens
        # reported, as vLLM's server counts it: text held back for a stop string is not reported yet).
        texts, outs, offsets = [[] for _ in range(req.n)], [0] * req.n, [0] * req.n
        n_prompt, ttft, status, error, traced, started = 0, 0.0, 200, "", False, False

        async def trace():
            nonlocal traced
            if not traced:
                traced = True
                choices = [dict(completion="".join(t), prompt_tokens=n_prompt, completion_tokens=n, ttft_ms=ttft)
                           for t, n in zip(texts, outs)]
                await self._trace(call, status=status, error=error, choices=choices)

        try:
            stream = self._engine(call.version).options(stream=True).generate_stream.remote(
                **engine_args(call, req))
            async for delta in stream:
                i = delta.index
                logprobs = req.format_logprobs(delta.logprobs, offset=offsets[i])
                offsets[i] += sum(len(t["token"]) for t in delta.logprobs or [])
                texts[i].append(delta.text)
                n_prompt, outs[i], ttft = delta.prompt_tokens, outs[i] + delta.completion_tokens, delta.ttft_ms
                started = True
                yield sse_chunk(call.request_id, call.model, chat, delta.text, index=i, logprobs=logprobs,
                                finish_reason=delta.finish_reason or None)
            # Durable before the stream is acknowledged as complete, as for non-streaming answers.
            await trace()
            if req.stream_options and req.stream_options.include_usage:
                yield sse_chunk(call.request_id, call.model, chat, None, usage=(n_prompt, sum(outs)))
            yield SSE_DONE
        except (asyncio.CancelledError, GeneratorExit):
            # Cancelled while awaiting the engine, or closed while paused at a `yield`.
            status, error = CLIENT_CLOSED, "client closed the stream"
            raise
        except Exception as e:  # noqa: BLE001 - every failure is traced and answered, never dropped
            if not started:  # no byte sent yet: the caller gets a real HTTP error (_complete's)
                traced = True
                raise await asyncio.shield(self._refusal(call, req, e)) from None
            # Headers are sent: the error in-band, in OpenAI's shape, then the stream ends cleanly.
            cause = getattr(e, "cause", None) or e
            status, error = 503, f"{type(cause).__name__}: {cause}"
            await trace()
            yield "data: " + json.dumps({"error": {"message": "the engine failed mid-answer; retry shortly",
                                                   "type": "server_error", "param": None, "code": None}}) + "\n\n"
            yield SSE_DONE
        finally:
            # Shielded: a client that hangs up mid-stream still leaves its trace record.
            await asyncio.shield(trace())

    @api.post("/v1/feedback")
    async def feedback(self, request: Request):
        """Outcome labels: `{"request_id": ..., "score": 0..1}` and/or `"label": str`, on one of the
        caller's own requests; joined to the trace by (tenant, request id)."""
        try:
            tenant = self._tenant(request)
            request_id, score, label = parse_feedback(await request.body())
            if not await self._owns(tenant, request_id):
                raise not_found(request_id)
        except BadRequest as e:
            return e.response()
        row = {"request_id": request_id, "tenant": tenant, "score": score, "label": label, "ts": time.time()}
        await self.trace_log.append_feedback.remote([row])
        return JSONResponse({"object": "feedback", "request_id": request_id, "recorded": True})

    async def _owns(self, tenant: str, request_id: str) -> bool:
        """Whether `request_id` is in the trace log as one of `tenant`'s requests. This replica knows
        the ones it traced; another replica's (or an older one's) are looked up in the log's files,
        where the answered request already is (its record is durable before the answer goes out)."""
        if (tenant, request_id) in self.owners:
            return True
        # TraceLog has no lookup method: `__ray_call__` runs ours on the actor, beside its files.
        if await self.trace_log.__ray_call__.remote(log_holds_request, tenant, request_id):
            self.owners.add(tenant, request_id)
            return True
        return False

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            tenant = self._tenant(request)
        except BadRequest as e:
            return e.response()
        await self._current_rollouts()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": tenant}
                for m, e in sorted(self.tenant_models[tenant].items()) if self.rollouts.get(e)]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/v1/models/{model_id}")
    async def model(self, model_id: str, request: Request):
        """One of the caller's served models; another tenant's is missing, as one that does not exist."""
        try:
            tenant = self._tenant(request)
            await self._current_rollouts()
            if not self.rollouts.get(self.tenant_models[tenant].get(model_id, "")):
                raise model_not_found(model_id)
        except BadRequest as e:
            return e.response()
        return JSONResponse({"id": model_id, "object": "model", "created": 0, "owned_by": tenant})

    # --- admin ------------------------------------------------------------------------------
    @api.get("/admin/status")
    async def status(self, request: Request):
        try:
            require_admin(request.headers, self.admin_key_hash)
        except BadRequest as e:
            return e.response()
        return JSONResponse({"endpoints": await self._current_rollouts(), "rollout_version": self._rollout_version,
                             "replica": {"pid": os.getpid(), "started_at": self.started_at}})

    @api.post("/admin/{action}")
    async def admin(self, action: str, request: Request):
        """deploy {model, version, role?, challenger_weight?} | weights {model, challenger_weight} |
        promote {model} | rollback {model}: MLflow's aliases change, then every replica serves them."""
        try:
            require_admin(request.headers, self.admin_key_hash)
            body = json_body(await request.body(), empty={})
            if self.controller is None:
                raise BadRequest("this gateway runs without a rollout controller", status=501,
                                 code="not_implemented", type_="server_error")
            unknown = set(body) - {"model", "version", "role", "challenger_weight"}
            if unknown:
                raise BadRequest(f"unknown field(s) {sorted(unknown)}: send model, version, role, challenger_weight",
                                 param=sorted(unknown)[0])
        except BadRequest as e:
            return e.response()
        try:
            rollout = await self.controller.act.remote(action, body.get("model", ""), version=body.get("version"),
                                                       weight=body.get("challenger_weight"),
                                                       role=body.get("role", "challenger"))
        except Exception as e:  # noqa: BLE001 - an AdminError is the caller's to fix; anything else is ours
            cause = getattr(e, "cause", None) or e
            if type(cause).__name__ == "AdminError":
                return error_response(cause.status, cause.message, param=cause.param,
                                      type_="invalid_request_error" if cause.status < 500 else "server_error")
            return error_response(500, f"{action} failed: {type(cause).__name__}: {cause}", type_="server_error")
        self._checked = 0.0  # this replica serves the change from its next request on
        await self._current_rollouts()
        return JSONResponse({"object": "rollout", "action": action, "model": body.get("model"), **rollout})
