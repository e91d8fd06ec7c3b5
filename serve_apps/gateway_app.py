"""The serving applications, built: one vLLM engine per base model, one engine per merged version,
and the OpenAI-compatible gateway.

They are separate Serve applications on purpose: `serve.run` gives every deployment of an app a new
version, so redeploying the gateway never restarts an engine. Moving to new rollouts redeploys
nothing at all: the rollout store is updated and every gateway replica reads it within POLL_S.
This module applies `serve.deployment` and nothing else: the app names, `serve.run`, readiness and
handles are `loop/cluster.py`'s.
"""
from __future__ import annotations

import functools

from ray import serve

from loop.config import LoopConfig
from loop.serving.engine import StudentEngine, tool_parser_problem
from loop.serving.gateway import Gateway, api


def engine_app(cfg: LoopConfig, name: str, model_dir: str, lora: bool, draft_dir: str | None = None):
    """One engine deployment (named as its app): multi-LoRA over a base, or a merged version with its draft."""
    eng = cfg.serving.engine
    options = {"num_cpus": eng.num_cpus, "num_gpus": eng.num_gpus}
    if eng.cpu_threads_bind != "auto":
        options["runtime_env"] = {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": eng.cpu_threads_bind}}
    return serve.deployment(
        StudentEngine, name=name,
        ray_actor_options=options,
        max_ongoing_requests=64, health_check_timeout_s=120, graceful_shutdown_timeout_s=5,
    ).bind(model_dir, eng, cfg.student.dtype, lora=lora, draft_dir=draft_dir)


@functools.cache
def ingress_gateway():
    """`serve.ingress` rewrites the FastAPI app's routes: apply it once per process."""
    return serve.ingress(api)(Gateway)


def build_gateway_app(cfg: LoopConfig, engine, trace_log, rollouts: dict, teacher_url: str | None = None,
                      rollout_store=None, controller=None, engine_handles=None):
    """The gateway over `engine` (the multi-LoRA engine's handle, or None); `engine_handles(app)` gives
    a merged version's engine (loop.cluster.engine_handle)."""
    tenants = {t.id: {"api_key_hashes": t.api_key_hashes, "endpoints": [e.id for e in t.endpoints]}
               for t in cfg.tenants}
    parser = cfg.student.tool_call_parser
    if parser and (problem := tool_parser_problem(parser, cfg.model_path(cfg.student))):
        raise ValueError(problem)
    return serve.deployment(
        ingress_gateway(), name="gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
        user_config={"endpoints": rollouts},
    ).bind(engine, trace_log, tenants, cfg.serving.admin_key_hash, *_cascade(cfg, teacher_url), rollout_store,
           controller, parser, engine_handles)


def _cascade(cfg: LoopConfig, teacher_url: str | None) -> tuple[dict, dict | None]:
    """Per-endpoint escalation thresholds, and how the gateway reaches the teacher."""
    from loop.teacher.client import teacher_key

    cascade = {e.id: e.cascade.min_mean_logprob for _, e in cfg.endpoints() if e.cascade}
    if not cascade or not teacher_url:
        return {}, None
    return cascade, {"base_url": teacher_url, "model": cfg.teacher.model, "api_key": teacher_key(cfg.teacher),
                     "timeout_s": cfg.teacher.timeout_s}
