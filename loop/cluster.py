"""The loop's Ray cluster: joining or starting it, its Serve applications (names, handles, readiness,
deploying and deleting them) and its named helper actors (trace log, rollout store, rollout controller).

This is the one module that knows the wiring: the applications themselves are built in
`serve_apps/` (which knows no app name and starts nothing), and the gateway and the rollout
controller are plain classes handed what they need (`engine_handle`, `MergedEngines`). MLflow's
`champion` alias says what is live; `reconcile` makes the gateway serve exactly that.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from loop.config import LoopConfig
from loop.lineage.registry import Lineage
from loop.models.fetch import read_manifest
from loop.serving.rollouts import POLL_S, RolloutController, RolloutStore
from loop.traces.log import TraceLog

TRACE_LOG_ACTOR = "loop-trace-log"
GATEWAY_APP = "gateway"
ENGINE_APP = "student-engine"
"""The multi-LoRA vLLM engine of the student base, shared by every `multi_lora` endpoint."""
MERGED_PREFIX = "merged-"
"""A `merged` endpoint's version runs in its own engine app, `merged-<endpoint>-<n>`."""


@dataclass
class Services:
    cfg: LoopConfig
    lineage: Lineage
    trace_log: object
    rollout_store: object
    rollout_controller: object
    teacher_url: str
    gateway_url: str
    base_manifest: dict
    draft_manifest: dict
    world: object | None = None
    """The simulation driving a `traffic.simulate: true` config (loop.config.simulation), else None."""


_ATTACHED: dict = {}
"""The `loopctl serve` this process joined (init_ray), if any: its cluster is not ours to stop."""


def init_ray(cfg: LoopConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    # Workers import `loop` and `serve_apps` from the (editable) install, or from the job's
    # working_dir under `ray job submit`.
    kwargs = dict(namespace=cfg.ray.namespace, ignore_reinit_error=True, log_to_driver=True)
    if not embedded(cfg):
        # Joining a cluster (`ray job submit` sets RAY_ADDRESS): its size is the cluster's business.
        ray.init(address=cfg.ray.address or os.environ["RAY_ADDRESS"], **kwargs)
    elif server := running_server(cfg):
        # A `loopctl serve` of this storage root is up: learn beside it, on its cluster, its Serve
        # apps and engine, so serving never stops for learning (and never starts twice).
        os.environ.setdefault("RAY_AUTH_MODE", server.get("auth_mode", "token"))
        ray.init(address=server["address"], **kwargs)
        _ATTACHED.update(server)
        print(f"[loop] attached to the running `loopctl serve` (pid {server['pid']}, Ray at {server['address']}): "
              "its gateway stays up", flush=True)
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def joined_server() -> dict | None:
    """The `loopctl serve` this process's Ray is joined to (init_ray), or None."""
    return dict(_ATTACHED) or None


def embedded(cfg: LoopConfig) -> bool:
    """True when no cluster is named (`ray.address`, RAY_ADDRESS): the loop runs on an in-process
    `ray.init()`, its own or that of a running `loopctl serve` (init_ray)."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def serving_file(cfg: LoopConfig) -> Path:
    """Where a running `loopctl serve` says how to join it (storage.root/serving.json)."""
    return cfg.storage.path("serving.json")


def running_server(cfg: LoopConfig) -> dict | None:
    """The `loopctl serve` of this storage root, if it is up ({address, pid, gateway_url, ...});
    None when there is none or its file outlived it (a crash or kill -9)."""
    path = serving_file(cfg)
    try:
        server = json.loads(path.read_text())
        os.kill(int(server["pid"]), 0)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return server if server.get("address") else None


def announce_serving(cfg: LoopConfig, gateway_url: str) -> None:
    """`loopctl serve`: write serving.json (atomically), so `loopctl run` joins this cluster."""
    import ray

    path = serving_file(cfg)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"address": ray.get_runtime_context().gcs_address, "pid": os.getpid(),
                               "namespace": cfg.ray.namespace, "gateway_url": gateway_url,
                               "auth_mode": os.environ.get("RAY_AUTH_MODE", "token"), "started_at": time.time()}))
    tmp.replace(path)


def withdraw_serving(cfg: LoopConfig) -> None:
    """`loopctl serve` stopping: its serving.json goes (only its own; a later server's stays)."""
    path = serving_file(cfg)
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def stop_services(cfg: LoopConfig) -> None:
    """A process that started its own in-process cluster stops Serve gracefully (engines release
    their memory), then Ray. On a cluster, or beside a `loopctl serve` it joined, the applications
    stay up after the driver ends: serving outlives the job that deployed it."""
    import ray

    if not (embedded(cfg) and ray.is_initialized()):
        return
    if not _ATTACHED:
        from ray import serve

        serve.shutdown()
    ray.shutdown()  # beside a `loopctl serve`: only this driver leaves


def start_serve(cfg: LoopConfig) -> None:
    """Serve on `serving.host:port`, its HTTP proxies running the gateway's proxy middleware (one
    `x-request-id` per response, the gateway's own: loop/serving/request_id.py). The proxies inherit
    the controller's environment; both are set only when Serve first starts on the cluster."""
    from ray import serve

    from loop.serving.request_id import PROXY_CALLBACK

    serve.start(http_options={"host": cfg.serving.host, "port": cfg.serving.port},
                controller_options={"runtime_env": {"env_vars": {
                    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK}}})


def start_services(cfg: LoopConfig, epoch: int) -> Services:
    from loop.config import simulation

    world = simulation(cfg)
    init_ray(cfg)
    base_manifest = read_manifest(cfg.model_path(cfg.student))
    lineage = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
    start_serve(cfg)
    trace_log, rollout_store, controller = helper_actors(cfg, lineage, base_manifest)
    # A local teacher has no endpoint: it lives in the cycle's Ray actors (labelling, training). The
    # reference teacher is the simulation's own endpoint.
    kind = cfg.teacher.kind
    teacher_url = cfg.teacher.base_url if kind == "openai" else "" if kind == "local" else world.start_teacher(epoch)
    services = Services(cfg, lineage, trace_log, rollout_store, controller, teacher_url,
                        f"http://{cfg.serving.host}:{cfg.serving.port}/v1", base_manifest,
                        read_manifest(cfg.model_path(cfg.draft)), world)
    reconcile(services)
    return services


def helper_actors(cfg: LoopConfig, lineage: Lineage | None = None, base_manifest: dict | None = None) -> tuple:
    """The trace log, rollout store and rollout controller: named, detached, one set per storage root
    (a later job on the same cluster with another root gets its own), created if absent; and version 1
    (the base) of every endpoint's registered model, so there is always a champion to serve."""
    import ray

    lineage = lineage or Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
    base_manifest = base_manifest or read_manifest(cfg.model_path(cfg.student))
    root_tag = hashlib.sha256(str(cfg.storage.path("traces")).encode()).hexdigest()[:8]
    # In the config's namespace whoever asks (a job, a test, a Serve builder in Serve's own namespace):
    # one set of helpers per loop, never a second store that no gateway reads.
    named = dict(lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1, max_task_retries=-1,
                 namespace=cfg.ray.namespace)
    trace_log = ray.remote(TraceLog).options(name=f"{TRACE_LOG_ACTOR}-{root_tag}", **named).remote(
        str(cfg.storage.path("traces")))
    rollout_store = ray.remote(RolloutStore).options(name=f"loop-rollouts-{root_tag}", **named).remote()
    for _, endpoint in cfg.endpoints():
        lineage.ensure_base_version(endpoint.id, cfg.model_path(cfg.student), base_manifest)
    # Serve calls from inside it (starting a merged version's engine) need no CPU of their own.
    controller = ray.remote(RolloutController).options(name=f"loop-rollout-controller-{root_tag}", **named).remote(
        _absolute(cfg), rollout_store, MergedEngines())
    ray.get(controller.configure.remote(_absolute(cfg)))
    return trace_log, rollout_store, controller


def _absolute(cfg: LoopConfig) -> LoopConfig:
    """`cfg` with its storage root resolved here: an actor's working directory is not the driver's."""
    return cfg.model_copy(update={"storage": cfg.storage.model_copy(update={"root": str(cfg.storage.path())})})


def reconcile(services: Services) -> dict:
    """Make the gateway serve what the registry says: the controller publishes MLflow's aliases to
    the rollout store (replicas pick them up in place); the gateway app is created if it is not up."""
    import ray

    rollouts = ray.get(services.rollout_controller.publish.remote())
    if running(GATEWAY_APP):
        _settle()
    else:
        deploy_gateway(services.cfg, services.trace_log, rollouts, services.teacher_url, services.rollout_store,
                       services.rollout_controller)
    return rollouts


def admin(services: Services, action: str, endpoint: str, **kwargs) -> dict:
    """One rollout action (see RolloutController.act), as the admin routes do it; returns the rollout
    once every gateway replica serves it."""
    import ray

    rollout = ray.get(services.rollout_controller.act.remote(action, endpoint, **kwargs))
    _settle()
    return rollout


def _settle() -> None:
    """Wait until every gateway replica has polled the rollout store since it changed."""
    time.sleep(2 * POLL_S)


# --- Serve applications ---------------------------------------------------------------------
def running(app: str) -> bool:
    from ray import serve

    st = serve.status().applications.get(app)
    return st is not None and st.status == "RUNNING"


def wait_running(app: str, timeout_s: float = 600) -> None:
    from ray import serve
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


def engine_handle(app: str = ENGINE_APP):
    """The handle of an engine app's one deployment (named as its app)."""
    from ray import serve

    return serve.get_deployment_handle(app, app_name=app)


def run_app(app, name: str, route_prefix: str | None = None) -> None:
    """`serve.run` an application built in serve_apps/ and wait until it is RUNNING."""
    from ray import serve

    serve.run(app, name=name, route_prefix=route_prefix, blocking=False)
    wait_running(name)


def delete_apps(apps: list[str], blocking: bool = False) -> None:
    from ray import serve

    for app in apps:
        serve.delete(app, _blocking=blocking)


def _engine_app(cfg: LoopConfig, app_name: str, model_dir: str, lora: bool, draft_dir: str | None = None) -> None:
    """Start one engine app unless it is already running (engine start: ~20-60 s on CPU)."""
    from serve_apps.gateway_app import engine_app

    if not running(app_name):
        run_app(engine_app(cfg, app_name, model_dir, lora, draft_dir), app_name)


def deploy_engine(cfg: LoopConfig) -> None:
    """The multi-LoRA engine of the student base model, shared by every `multi_lora` endpoint."""
    _engine_app(cfg, ENGINE_APP, str(cfg.model_path(cfg.student)), lora=True)


def engine_matches(cfg: LoopConfig) -> bool:
    """Whether the running multi-LoRA engine app is the one `cfg` would start (the same base model,
    engine settings and dtype), so a caller may keep it instead of paying an engine start."""
    if not running(ENGINE_APP):
        return False
    try:
        info = engine_handle().info.remote().result(timeout_s=30)
    except Exception:  # noqa: BLE001 - an engine that cannot say what it serves is not kept
        return False
    wanted = {"model": str(cfg.model_path(cfg.student)), "lora": True, "dtype": cfg.student.dtype,
              "engine": cfg.serving.engine.model_dump(mode="json")}
    return all(info.get(k) == v for k, v in wanted.items())


class MergedEngines:
    """The engine apps of `merged` endpoints' versions, as the RolloutController starts and retires
    them (handed to it, so it looks up nothing itself)."""

    def start(self, cfg: LoopConfig, endpoint: str, number: int, model_dir: str, draft_dir: str | None) -> str:
        """The engine of one merged version with its draft; returns its app (and deployment) name."""
        name = f"{MERGED_PREFIX}{endpoint}-{number}"
        _engine_app(cfg, name, model_dir, lora=False, draft_dir=draft_dir)
        return name

    def running(self, endpoint: str) -> list[str]:
        """The running engine apps of `endpoint`'s merged versions."""
        from ray import serve

        pattern = re.compile(rf"{MERGED_PREFIX}{re.escape(endpoint)}-\d+")
        return [a for a in serve.status().applications if pattern.fullmatch(a)]

    def stop(self, apps: list[str]) -> None:
        delete_apps(apps)


def _multi_lora(cfg: LoopConfig) -> bool:
    return any(e.backend == "multi_lora" for _, e in cfg.endpoints())


def gateway_app(cfg: LoopConfig, trace_log, rollouts: dict, teacher_url: str | None = None, rollout_store=None,
                controller=None):
    """The gateway application, bound to the multi-LoRA engine (if an endpoint needs it)."""
    from serve_apps.gateway_app import build_gateway_app

    engine = engine_handle() if _multi_lora(cfg) else None
    return build_gateway_app(cfg, engine, trace_log, rollouts, teacher_url, rollout_store, controller,
                             engine_handles=engine_handle)


def deploy_gateway(cfg: LoopConfig, trace_log, rollouts: dict, teacher_url: str | None = None,
                   rollout_store=None, controller=None) -> None:
    """Move the gateway to `rollouts`: in place through the rollout store when the app is running,
    otherwise create it (and the engine app, if needed)."""
    import ray

    if rollout_store is not None:
        ray.get(rollout_store.set.remote(rollouts))
        if running(GATEWAY_APP):
            time.sleep(2 * POLL_S)  # every replica reads the store on its next request after POLL_S
            return
    if _multi_lora(cfg):
        deploy_engine(cfg)
    run_app(gateway_app(cfg, trace_log, rollouts, teacher_url, rollout_store, controller), GATEWAY_APP, "/")
