"""The serving applications: one vLLM engine per base model, one engine per merged version, and
the OpenAI-compatible gateway.

They are separate Serve applications on purpose: `serve.run` gives every deployment of an app a new
version, so redeploying the gateway never restarts an engine. Moving to new rollouts redeploys
nothing at all: the rollout store is updated and every gateway replica reads it within POLL_S.
A `merged` endpoint's version runs in its own app `merged-<endpoint>-<n>`, started once.
"""
from __future__ import annotations

import functools
import re
import time

from ray import serve

from loop.config import LoopConfig
from loop.serving.engine import StudentEngine, tool_parser_problem
from loop.serving.gateway import Gateway, api

APP_NAME = "gateway"
ENGINE_APP = "student-engine"
MERGED_PREFIX = "merged-"


def _running(app: str) -> bool:
    st = serve.status().applications.get(app)
    return st is not None and st.status == "RUNNING"


def _engine_app(cfg: LoopConfig, app_name: str, model_dir: str, lora: bool, draft_dir: str | None = None) -> None:
    """Start one engine app unless it is already running (engine start: ~20-60 s on CPU)."""
    if _running(app_name):
        return
    eng = cfg.serving.engine
    options = {"num_cpus": eng.num_cpus, "num_gpus": eng.num_gpus}
    if eng.cpu_threads_bind != "auto":
        options["runtime_env"] = {"env_vars": {"VLLM_CPU_OMP_THREADS_BIND": eng.cpu_threads_bind}}
    app = serve.deployment(
        StudentEngine, name=app_name,
        ray_actor_options=options,
        max_ongoing_requests=64, health_check_timeout_s=120, graceful_shutdown_timeout_s=5,
    ).bind(model_dir, eng, cfg.student.dtype, lora=lora, draft_dir=draft_dir)
    serve.run(app, name=app_name, route_prefix=None, blocking=False)
    _wait_running(app_name)


def deploy_engine(cfg: LoopConfig) -> None:
    """The multi-LoRA engine of the student base model, shared by every `multi_lora` endpoint."""
    _engine_app(cfg, ENGINE_APP, str(cfg.model_path(cfg.student)), lora=True)


def engine_matches(cfg: LoopConfig) -> bool:
    """Whether the running multi-LoRA engine app is the one `cfg` would start (the same base model,
    engine settings and dtype), so a caller may keep it instead of paying an engine start."""
    if not _running(ENGINE_APP):
        return False
    try:
        info = serve.get_deployment_handle(ENGINE_APP, app_name=ENGINE_APP).info.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 - an engine that cannot say what it serves is not kept
        return False
    wanted = {"model": str(cfg.model_path(cfg.student)), "lora": True, "dtype": cfg.student.dtype,
              "engine": cfg.serving.engine.model_dump(mode="json")}
    return all(info.get(k) == v for k, v in wanted.items())


def deploy_merged_engine(cfg: LoopConfig, endpoint: str, number: int, model_dir: str, draft_dir: str | None) -> str:
    """The engine of one merged version with its draft; returns its app (and deployment) name."""
    name = f"{MERGED_PREFIX}{endpoint}-{number}"
    _engine_app(cfg, name, model_dir, lora=False, draft_dir=draft_dir)
    return name


def merged_apps(endpoint: str) -> list[str]:
    """The running engine apps of `endpoint`'s merged versions."""
    pattern = re.compile(rf"{MERGED_PREFIX}{re.escape(endpoint)}-\d+")
    return [a for a in serve.status().applications if pattern.fullmatch(a)]


def delete_apps(apps: list[str]) -> None:
    for app in apps:
        serve.delete(app, _blocking=False)


@functools.cache
def ingress_gateway():
    """`serve.ingress` rewrites the FastAPI app's routes: apply it once per process."""
    return serve.ingress(api)(Gateway)


def build_gateway_app(cfg: LoopConfig, trace_log, rollouts: dict, teacher_url: str | None = None,
                      rollout_store=None, controller=None):
    engine = serve.get_deployment_handle(ENGINE_APP, app_name=ENGINE_APP) if _multi_lora(cfg) else None
    tenants = {t.id: {"api_key_hashes": t.api_key_hashes, "endpoints": [e.id for e in t.endpoints]}
               for t in cfg.tenants}
    parser = cfg.student.tool_call_parser
    if parser and (problem := tool_parser_problem(parser, cfg.model_path(cfg.student))):
        raise ValueError(problem)
    gateway = serve.deployment(
        ingress_gateway(), name="gateway", ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256,
        user_config={"endpoints": rollouts},
    ).bind(engine, trace_log, tenants, cfg.serving.admin_key_hash, *_cascade(cfg, teacher_url), rollout_store,
           controller, parser)
    return gateway


def _multi_lora(cfg: LoopConfig) -> bool:
    return any(e.backend == "multi_lora" for _, e in cfg.endpoints())


def _cascade(cfg: LoopConfig, teacher_url: str | None) -> tuple[dict, dict | None]:
    """Per-endpoint escalation thresholds, and how the gateway reaches the teacher."""
    from loop.teacher.client import teacher_key

    cascade = {e.id: e.cascade.min_mean_logprob for _, e in cfg.endpoints() if e.cascade}
    if not cascade or not teacher_url:
        return {}, None
    return cascade, {"base_url": teacher_url, "model": cfg.teacher.model, "api_key": teacher_key(cfg.teacher),
                     "timeout_s": cfg.teacher.timeout_s}


def deploy_gateway(cfg: LoopConfig, trace_log, rollouts: dict, teacher_url: str | None = None,
                   rollout_store=None, controller=None) -> None:
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
    if _multi_lora(cfg):
        deploy_engine(cfg)
    serve.run(build_gateway_app(cfg, trace_log, rollouts, teacher_url, rollout_store, controller), name=APP_NAME,
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
