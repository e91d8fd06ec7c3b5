"""The reference teacher as a Serve app under `/teacher`: an OpenAI-compatible frontier stand-in."""
from __future__ import annotations

import functools

from ray import serve

from loop.config import LoopConfig
from loop.sim.teacher import ReferenceTeacher, api
from serve_apps.gateway_app import _wait_running

APP_NAME = "teacher"
ROUTE = "/teacher"


@functools.cache
def _ingress_teacher():
    return serve.ingress(api)(ReferenceTeacher)


def deploy_teacher(cfg: LoopConfig, epoch: int) -> str:
    """Deploy (or move to `epoch`) the reference teacher; returns its OpenAI base URL."""
    w = cfg.world
    app = serve.deployment(
        _ingress_teacher(), name="reference-teacher",
        ray_actor_options={"num_cpus": 0}, user_config={"epoch": epoch},
    ).bind(w.seed, w.num_entities, w.drift_fraction, w.new_per_epoch, cfg.teacher.model,
           str(cfg.model_path(cfg.student)))
    serve.run(app, name=APP_NAME, route_prefix=ROUTE, blocking=False)
    _wait_running(APP_NAME)
    return f"http://{cfg.serving.host}:{cfg.serving.port}{ROUTE}/v1"
