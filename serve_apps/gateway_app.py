"""The serving application: one vLLM engine per base model, and the OpenAI-compatible gateway.

The engine's deployment version is pinned to its model digest and engine settings, and the
gateway's to its tenants, so redeploying with new rollouts (the gateway's `user_config`) reconfigures
replicas in place: no engine restart, a new version is live in seconds.
"""
from __future__ import annotations

import hashlib
import json

from ray import serve

from loop.config import LoopConfig
from loop.serving.engine import StudentEngine
from loop.serving.gateway import Gateway, api

APP_NAME = "gateway"


def _version(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def build_gateway_app(cfg: LoopConfig, trace_log, rollouts: dict, base_digest: str):
    eng = cfg.serving.engine
    engine = serve.deployment(
        StudentEngine, name="student-engine", version=_version(base_digest, eng.model_dump()),
        ray_actor_options={"num_cpus": eng.num_cpus, "num_gpus": eng.num_gpus},
        max_ongoing_requests=64, health_check_timeout_s=120, graceful_shutdown_timeout_s=5,
    ).bind(str(cfg.model_path(cfg.student)), eng, cfg.student.dtype)
    tenants = {t.id: {"api_key_hashes": t.api_key_hashes, "endpoints": [e.id for e in t.endpoints]}
               for t in cfg.tenants}
    gateway = serve.deployment(
        serve.ingress(api)(Gateway), name="gateway",
        version=_version(tenants, cfg.serving.admin_key_hash),
        ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
        user_config={"endpoints": rollouts},
    ).bind(engine, trace_log, tenants, cfg.serving.admin_key_hash)
    return gateway


def deploy_gateway(cfg: LoopConfig, trace_log, rollouts: dict, base_digest: str) -> None:
    """Create the app, or move it to new rollouts (in place when only the rollouts changed)."""
    serve.run(build_gateway_app(cfg, trace_log, rollouts, base_digest), name=APP_NAME, route_prefix="/",
              blocking=False)
    _wait_running(APP_NAME)


def _wait_running(app: str, timeout_s: float = 600) -> None:
    import time

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
