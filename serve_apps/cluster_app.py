"""Serve application builders for a declarative deployment: a KubeRay RayService (deploy/rayservice.yaml)
or `serve deploy`. Each takes `args: {config: PATH}` (a loop config on storage every node mounts).

    student-engine: serve_apps.cluster_app:engine   the multi-LoRA vLLM engine of the student base
    gateway:        serve_apps.cluster_app:gateway  the OpenAI-compatible gateway

The gateway's helpers (trace log, rollout store, rollout controller) are the same named, detached
actors the loop driver uses, created here if the driver has not made them yet, and the gateway
starts on what MLflow says is live. The loop itself runs as a Ray job against the same cluster
(`ray job submit ... jobs/run_loop.py --config ... --forever`): its deploys and promotions change
MLflow's aliases and the rollout store, never this config. `merged` endpoints start one engine app
per live version from the rollout controller; under a RayService, prefer `multi_lora` endpoints,
since the operator owns the app list it declares.
"""
from __future__ import annotations

from loop.config import load_config


def engine(args: dict):
    from loop.cluster import ENGINE_APP
    from serve_apps.gateway_app import engine_app

    cfg = load_config(args["config"])
    return engine_app(cfg, ENGINE_APP, str(cfg.model_path(cfg.student)), lora=True)


def gateway(args: dict):
    import ray

    from loop.cluster import gateway_app, helper_actors

    cfg = load_config(args["config"])
    trace_log, rollout_store, controller = helper_actors(cfg)
    rollouts = ray.get(controller.live.remote())
    teacher_url = cfg.teacher.base_url if cfg.teacher.kind == "openai" else None
    return gateway_app(cfg, trace_log, rollouts, teacher_url, rollout_store, controller)
