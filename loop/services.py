"""The Ray topology of the loop: cluster, trace-log actor, teacher and gateway apps, reconciliation.

Everything that applies `ray.remote` or talks to Serve for the driver lives here, so the numerical
code (training, merge, validation) stays free of Ray wiring. MLflow's `champion` alias says what is
live; `reconcile` makes the gateway serve exactly that.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

from loop.config import LoopConfig
from loop.lineage.registry import Lineage
from loop.models.fetch import read_manifest

TRACE_LOG_ACTOR = "loop-trace-log"


@dataclass
class Services:
    cfg: LoopConfig
    lineage: Lineage
    trace_log: object
    rollout_store: object
    teacher_url: str
    gateway_url: str
    base_manifest: dict
    draft_manifest: dict
    teacher_epoch: int = 0


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
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=True, dashboard_host="127.0.0.1", **kwargs)


def embedded(cfg: LoopConfig) -> bool:
    """True when this process owns its Ray cluster (in-process `ray.init()`), not a job on a cluster."""
    return not (cfg.ray.address or os.environ.get("RAY_ADDRESS"))


def stop_services(cfg: LoopConfig) -> None:
    """Embedded mode: stop Serve gracefully (engines release their memory), then Ray. On a cluster
    the applications stay up after the driver ends: serving outlives the job that deployed it."""
    import ray

    if embedded(cfg) and ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()


def start_services(cfg: LoopConfig, epoch: int) -> Services:
    import ray
    from ray import serve

    from loop.serving.rollouts import RolloutStore
    from loop.traces.log import TraceLog
    from serve_apps.teacher_app import deploy_teacher

    init_ray(cfg)
    base_manifest = read_manifest(cfg.model_path(cfg.student))
    lineage = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
    serve.start(http_options={"host": cfg.serving.host, "port": cfg.serving.port})
    # One writer per storage root: a later job on the same cluster with another root gets its own.
    root_tag = hashlib.sha256(str(cfg.storage.path("traces")).encode()).hexdigest()[:8]
    trace_log = ray.remote(TraceLog).options(
        name=f"{TRACE_LOG_ACTOR}-{root_tag}", lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1,
        max_task_retries=-1,
    ).remote(str(cfg.storage.path("traces")))
    rollout_store = ray.remote(RolloutStore).options(
        name=f"loop-rollouts-{root_tag}", lifetime="detached", get_if_exists=True, num_cpus=0, max_restarts=-1,
        max_task_retries=-1).remote()
    teacher_url = cfg.teacher.base_url if cfg.teacher.kind == "openai" else deploy_teacher(cfg, epoch)
    services = Services(cfg, lineage, trace_log, rollout_store, teacher_url,
                        f"http://{cfg.serving.host}:{cfg.serving.port}/v1", base_manifest,
                        read_manifest(cfg.model_path(cfg.draft)), epoch)
    for _, endpoint in cfg.endpoints():
        lineage.ensure_base_version(endpoint.id, cfg.model_path(cfg.student), base_manifest)
    reconcile(services)
    return services


def live_rollouts(services: Services) -> dict:
    """What MLflow says is live, per endpoint, in the gateway's `user_config` shape."""
    out = {}
    for _, endpoint in services.cfg.endpoints():
        champion = services.lineage.version_info(endpoint.id, "champion")
        challenger = services.lineage.version_info(endpoint.id, "challenger")
        out[endpoint.id] = {"champion": champion, "challenger": challenger,
                            "challenger_weight": services.cfg.rollout.challenger_weight if challenger else 0.0,
                            "rollout_id": f"{champion['number']}-{challenger['number'] if challenger else ''}"}
    return out


def reconcile(services: Services) -> dict:
    """Make the gateway serve what the registry says (in place: replicas are reconfigured)."""
    from serve_apps.gateway_app import deploy_gateway

    rollouts = live_rollouts(services)
    deploy_gateway(services.cfg, services.trace_log, rollouts, services.teacher_url, services.rollout_store)
    return rollouts


def set_teacher_epoch(services: Services, epoch: int) -> None:
    """Move the reference teacher to `epoch` (a redeploy), unless it is there already."""
    if services.cfg.teacher.kind == "reference" and services.teacher_epoch != epoch:
        from serve_apps.teacher_app import deploy_teacher

        deploy_teacher(services.cfg, epoch)
        services.teacher_epoch = epoch
