"""The serving applications: one vLLM engine per base model, and the OpenAI-compatible gateway.

They are two Serve applications on purpose: `serve.run` gives every deployment of an app a new
version, so redeploying the gateway never restarts the engine. Moving to new rollouts redeploys
nothing at all: the rollout store is updated and every gateway replica reads it within POLL_S.
"""
from __future__ import annotations

import functools
import time

from ray import serve

from loop.config import LoopConfig
from loop.serving.engine import StudentEngine
from loop.serving.gateway import Gateway, api

APP_NAME = "gateway"
ENGINE_APP = "student-engine"


def deploy_engine(cfg: LoopConfig) -> None:
    """Start the student engine app unless it is already running (engine start: ~20-60 s on CPU)."""
    st = serve.status().applications.get(ENGINE_APP)
    if st is not None and st.status == "RUNNING":
        return
    eng = cfg.serving.engine
    app = serve.deployment(
        StudentEngine, name=ENGINE_APP,
        ray_actor_options={"num_cpus": eng.num_cpus, "num_gpus": eng.num_gpus},
        max_ongoing_requests=64, health_check_timeout_s=120, graceful_shutdown_timeout_s=5,
    ).bind(str(cfg.model_path(cfg.student)), eng, cfg.student.dtype)
    serve.run(app, name=ENGINE_APP, route_prefix=None, blocking=False)
    _wait_running(ENGINE_APP)


@functools.cache
def ingress_gateway():
    """`serve.ingress` rewrites the FastAPI app's routes: apply it once per process."""
    return serve.ingress(api)(Gateway)


def build_gateway_app(cfg: LoopConfig, trace_log, rollouts: dict, teacher_url: str | None = None,
                      rollout_store=None):
    engine = serve.get_deployment_handle(ENGINE_APP, app_name=ENGINE_APP)
    tenants = {t.id: {"api_key_hashes": t.api_key_hashes, "endpoints": [e.id for e in t.endpoints]}
               for t in cfg.tenants}
    gateway = serve.deployment(
        ingress_gateway(), name="gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
        user_config={"endpoints": rollouts},
    ).bind(engine, trace_log, tenants, cfg.serving.admin_key_hash, *_cascade(cfg, teacher_url), rollout_store)
    return gateway


def _cascade(cfg: LoopConfig, teacher_url: str | None) -> tuple[dict, dict | None]:
    """Per-endpoint escalation thresholds, and how the gateway reaches the teacher."""
    from loop.teacher.client import teacher_key

    cascade = {e.id: e.cascade.min_mean_logprob for _, e in cfg.endpoints() if e.cascade}
    if not cascade or not teacher_url:
        return {}, None
    return cascade, {"base_url": teacher_url, "model": cfg.teacher.model, "api_key": teacher_key(cfg.teacher),
                     "timeout_s": cfg.teacher.timeout_s}


def deploy_gateway(cfg: LoopConfig, trace_log, rollouts: dict, teacher_url: str | None = None,
                   rollout_store=None) -> None:
    """Move the gateway to `rollouts`: in place through the rollout store when the app is running,
    otherwise create it (and the engine app, if needed)."""
    import ray

    from loop.serving.rollouts import POLL_S

    if rollout_store is not None:
        ray.get(rollout_store.set.remote(rollouts))
        st = serve.status().applications.get(APP_NAME)
        if st is not None and st.status == "RUNNING":
            time.sleep(2 * POLL_S)  # every replica reads the store on its next request after POLL_S
            return
    deploy_engine(cfg)
    serve.run(build_gateway_app(cfg, trace_log, rollouts, teacher_url, rollout_store), name=APP_NAME,
              route_prefix="/", blocking=False)
    _wait_running(APP_NAME)


def _wait_running(app: str, timeout_s: float = 600) -> None:
    from ray.serve.schema import ApplicationStatus

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        st = serve.status().applications.get(app)
        if st and st.status == ApplicationStatus.RUNNING:
            return
        if st and st.status in (ApplicationStatus.DEPLOY_FAILED, ApplicationStatus.UNHEALTHY):
            raise RuntimeError(f"Serve app '{app}' {st.status}: {st.message}")
        time.sleep(1)
    raise TimeoutError(f"Serve app '{app}' not RUNNING after {timeout_s:.0f} s")
