"""Run N cycles for every endpoint of a config and print what happened; shared by `loopctl run`
and `jobs/run_loop.py`. Errors a user can fix end as one line and exit code 2."""
from __future__ import annotations

import json
import os
import sys
import time

from loop.config import ConfigError, LoopConfig, load_config


def _next_cycle(cfg: LoopConfig, endpoint: str) -> int:
    """The first cycle without a finished report: a crashed cycle is resumed, not restarted."""
    n = 1
    while cfg.storage.path("cycles", endpoint, f"cycle-{n:04d}", "report.json").exists():
        n += 1
    return n


def latest_epoch(cfg: LoopConfig) -> int:
    """The world epoch of the newest finished cycle (0 before any)."""
    return max((_next_cycle(cfg, e.id) - 1 for _, e in cfg.endpoints()), default=0)


def run(cfg: LoopConfig, cycles: int) -> list[dict]:
    from loop.cycle import Cycle
    from loop.models.fetch import read_manifest
    from loop.services import start_services, stop_services
    from loop.teacher.client import check_reachable
    from loop.teacher.local import check_same_tokenizer

    keys = {}
    for i, tenant in enumerate(cfg.tenants):
        if not tenant.sim_api_key_env or not os.environ.get(tenant.sim_api_key_env):
            raise ConfigError(f"tenants[{i}].sim_api_key_env: the simulated users of tenant {tenant.id} need a key; "
                              f"set the field and export that variable (the Makefile exports the demo keys)")
        keys[tenant.id] = os.environ[tenant.sim_api_key_env]
    # Fail fast, before anything starts or is written: models present, external teacher reachable.
    for model in (cfg.student, cfg.draft):
        read_manifest(cfg.model_path(model))
    if cfg.teacher.kind == "openai":
        check_reachable(cfg.teacher, cfg.teacher.base_url)
    if cfg.teacher.kind == "local":
        teacher_dir = cfg.model_path(cfg.teacher)
        if not (teacher_dir / "config.json").exists():
            raise ConfigError(f"teacher.path: {teacher_dir} holds no Hugging Face model (config.json); "
                              "download or save the teacher there")
        check_same_tokenizer(cfg.model_path(cfg.student), teacher_dir)
    t0 = time.perf_counter()
    first = min(_next_cycle(cfg, e.id) for _, e in cfg.endpoints())
    print(f"[loop] {cfg.name}: starting Ray, MLflow ({cfg.storage.tracking_uri}), teacher and gateway", flush=True)
    services = start_services(cfg, epoch=first)
    print(f"[loop] services up in {time.perf_counter() - t0:.1f} s; gateway {services.gateway_url}", flush=True)
    try:
        return _cycles(cfg, services, keys, cycles, t0)
    finally:
        stop_services(cfg)


def _cycles(cfg, services, keys, cycles, t0) -> list[dict]:
    from loop.cycle import Cycle

    reports = []
    for _ in range(cycles):
        for tenant, endpoint in cfg.endpoints():
            n = _next_cycle(cfg, endpoint.id)
            print(f"[loop] cycle {n} of model-{endpoint.id} (world epoch {n})", flush=True)
            rep = Cycle(cfg, services, endpoint, n, keys[tenant.id], progress=lambda m: print(m, flush=True)).run()
            reports.append(rep.__dict__)
            _print_report(rep)
    print(f"[loop] done in {time.perf_counter() - t0:.1f} s. Where to look next:\n"
          f"[loop]   lineage:  mlflow ui --backend-store-uri {cfg.storage.tracking_uri}\n"
          f"[loop]   serving:  loopctl serve CONFIG (or make serve), then the openai client at {services.gateway_url}\n"
          f"[loop]   outputs:  {cfg.storage.path('cycles')}", flush=True)
    return reports


def _print_report(rep) -> None:
    stages = ", ".join(f"{k} {v:.1f}s" for k, v in rep.stage_seconds.items())
    print(f"[loop] cycle {rep.cycle} model-{rep.endpoint}: student accuracy {rep.student_acc_before:.2f} -> "
          f"{rep.student_acc_after:.2f} (teacher {rep.teacher_acc:.2f}); served by {rep.served_before} -> "
          f"{rep.served_after}; new version {rep.new_version or 'none'}"
          f"{'' if rep.validation_passed else ' (gate failed: ' + '; '.join(rep.notes) + ')'}", flush=True)
    print(f"[loop]   stage times: {stages}", flush=True)


def main(config_path: str, cycles: int, report_json: str | None = None) -> int:
    from loop.cycle import CycleFailed
    from loop.models.fetch import ModelMissing
    from loop.teacher.client import TeacherUnreachable
    from loop.teacher.local import TokenizerMismatch

    try:
        cfg = load_config(config_path)
        reports = run(cfg, cycles)
    except (ConfigError, ModelMissing, TeacherUnreachable, TokenizerMismatch, CycleFailed) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    if report_json:
        with open(report_json, "w") as f:
            json.dump(reports, f, indent=2, default=str)
    return 0
