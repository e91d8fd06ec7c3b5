"""The OpenAI-compatible gateway: authenticate, route to a variant, generate, trace, answer.

A plain class behind a FastAPI app that Ray Serve mounts (`serve_apps/gateway_app.py` applies
`serve.ingress(api)` and `serve.deployment`). The engine and the trace log are passed in as handles, so routing can be tested
with a fake engine. Rollouts arrive through `reconfigure` (Serve `user_config`); a redeploy restarts
only this light replica, never the engine (see serve_apps/gateway_app.py).
"""
from __future__ import annotations

import hashlib
import json
import time

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from loop.config import hash_api_key
from loop.serving.protocol import BadRequest, chat_completion_body, error_response, parse_chat_request
from loop.traces.log import new_request_id

api = FastAPI(title="continual-loop gateway", version="0.1")


def assign_variant(rollout: dict, user: str) -> str:
    """Sticky split: a user's hash decides the arm, so one user sees one arm for the rollout's life."""
    weight = float(rollout.get("challenger_weight") or 0.0)
    if not rollout.get("challenger") or weight <= 0:
        return "champion"
    bucket = int(hashlib.sha256(f"{rollout.get('rollout_id', '')}/{user}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "challenger" if bucket < weight else "champion"


class Gateway:
    def __init__(self, engine, trace_log, tenants: dict[str, dict], admin_key_hash: str | None = None):
        """`tenants`: tenant id -> {"api_key_hashes": [...], "endpoints": [endpoint ids]}."""
        self.engine, self.trace_log = engine, trace_log
        self.key_to_tenant = {h: t for t, spec in tenants.items() for h in spec["api_key_hashes"]}
        self.tenant_models = {t: {f"model-{e}": e for e in spec["endpoints"]} for t, spec in tenants.items()}
        self.admin_key_hash = admin_key_hash
        self.rollouts: dict[str, dict] = {}

    def reconfigure(self, config: dict) -> None:
        self.rollouts = dict(config.get("endpoints", {}))

    def _tenant(self, request: Request) -> str:
        auth = request.headers.get("authorization", "")
        if not auth.lower().startswith("bearer ") or not auth[7:].strip():
            raise BadRequest("missing API key: send 'Authorization: Bearer <key>'", status=401,
                             code="invalid_api_key", type_="authentication_error")
        tenant = self.key_to_tenant.get(hash_api_key(auth[7:].strip()))
        if tenant is None:
            raise BadRequest("invalid API key", status=401, code="invalid_api_key", type_="authentication_error")
        return tenant

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        started = time.perf_counter()
        # Ray Serve's proxy gives every request an `x-request-id` (the client's, or a fresh one) and
        # always returns it in the response; the trace uses the same id, so the two always agree.
        request_id = request.headers.get("x-request-id", "")[:128] or new_request_id()
        headers: dict[str, str] = {}
        try:
            tenant = self._tenant(request)
            req = parse_chat_request(await request.body())
            endpoint = self.tenant_models[tenant].get(req.model)
            if endpoint is None:
                # Another tenant's model is reported exactly like a missing one: no existence leak.
                raise BadRequest(f"model '{req.model}' does not exist or you do not have access to it",
                                 param="model", status=404, code="model_not_found")
            rollout = self.rollouts.get(endpoint)
            if not rollout or not rollout.get("champion"):
                raise BadRequest(f"model '{req.model}' has no deployed version yet", status=503,
                                 code="not_deployed", type_="server_error")
        except BadRequest as e:
            return e.response(headers)
        user = request.headers.get("x-loop-user") or req.user or ""
        variant = assign_variant(rollout, user)
        version = rollout[variant]
        headers.update({"x-model-version": version["version"], "x-variant": variant})
        messages = [m.model_dump() for m in req.messages]
        record = dict(request_id=request_id, tenant=tenant, endpoint=endpoint, variant=variant,
                      model_version=version["version"], adapter_digest=version.get("adapter_digest", ""),
                      checkpoint_digest=version.get("checkpoint_digest", ""),
                      training_run_id=version.get("training_run_id", ""),
                      deployed_at=version.get("deployed_at", ""), user=user, prompt=json.dumps(messages),
                      ts=time.time())  # set once here: a retried append is recognised as the same record
        try:
            gen = await self.engine.generate.remote(
                messages, max_tokens=req.token_limit, temperature=req.temperature, top_p=req.top_p,
                seed=req.seed, adapter_path=version.get("adapter_path"), request_id=request_id)
        except Exception as e:  # noqa: BLE001 - every failure is traced and answered, never dropped
            cause = getattr(e, "cause", None) or e  # a Ray task error wraps the engine's exception
            error = f"{type(cause).__name__}: {cause}"
            is_context = isinstance(cause, ValueError) and "context" in str(cause)
            status, msg = (400, str(cause)) if is_context else (503, "the engine failed; retry shortly")
            record.update(status=status, error=error[:500], latency_ms=(time.perf_counter() - started) * 1000)
            await self.trace_log.append.remote([record])
            return error_response(status, msg, type_="invalid_request_error" if status == 400 else "server_error",
                                  headers={**headers, **({"retry-after": "1"} if status == 503 else {})})
        record.update(completion=gen.text, prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens,
                      ttft_ms=gen.ttft_ms, latency_ms=(time.perf_counter() - started) * 1000)
        # Acknowledge only what is durable: the record is in the write-ahead log before we answer.
        await self.trace_log.append.remote([record])
        body = chat_completion_body(request_id, req.model, gen.text, gen.prompt_tokens, gen.completion_tokens,
                                    gen.finish_reason)
        return JSONResponse(body, headers=headers)

    @api.get("/v1/models")
    async def models(self, request: Request):
        try:
            tenant = self._tenant(request)
        except BadRequest as e:
            return e.response()
        data = [{"id": m, "object": "model", "created": 0, "owned_by": tenant}
                for m, e in sorted(self.tenant_models[tenant].items()) if self.rollouts.get(e)]
        return JSONResponse({"object": "list", "data": data})

    @api.get("/admin/status")
    async def status(self, request: Request):
        auth = request.headers.get("authorization", "")
        if not self.admin_key_hash or hash_api_key(auth[7:].strip()) != self.admin_key_hash:
            return error_response(403, "admin key required", type_="permission_error", code="forbidden")
        return JSONResponse({"endpoints": self.rollouts})

