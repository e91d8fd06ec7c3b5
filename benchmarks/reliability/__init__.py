"""Reliability and security of the running stack, with figures: load held, faults survived, bad input
refused, tenants isolated. `loopctl bench reliability --config configs/tiny.yaml` (two tenants needed).

Scenarios live by kind: `api` (load, batches, bad input, isolation, secrets, fuzz), `faults` (engine,
trace writer, teacher, MLflow, disk), `lifecycle` (driver killed in each stage, corrupt models);
`traffic` sends the requests and checks them against the trace log.

Everything is real: the gateway (Ray Serve), the multi-LoRA vLLM engine, the trace writer actor, the
reference teacher, MLflow. Each scenario in `scenarios` has `sent`, `failed`, `status_5xx`, `lost`
(answered requests with no trace record, labels neither made nor recorded as failed, registered
partial checkpoints: must be 0) and `recover_s` (fault -> first success after it; 0 when nothing broke).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

from benchmarks.reliability.api import (scenario_bad_input, scenario_fuzz, scenario_isolation, scenario_load,
                                        scenario_mixed_batches, scenario_secrets)
from benchmarks.reliability.faults import (scenario_disk_full, scenario_engine_killed, scenario_mlflow_unreachable,
                                           scenario_teacher_faults, scenario_trace_writer_killed)
from benchmarks.reliability.lifecycle import scenario_bad_config, scenario_corrupt_artifacts, scenario_driver_killed
from benchmarks.reliability.traffic import bench_config, fresh_services, register_challenger
from loop.config import LoopConfig


def run(cfg: LoopConfig, requests: int = 1000, concurrency: int = 32, max_tokens: int = 8,
        fault_requests: int = 300, label_prompts: int = 80, fuzz_examples: int = 300,
        root: Path | None = None, dashboard: str = "http://127.0.0.1:8265", skip: tuple[str, ...] = ()) -> dict:
    from loop.cluster import stop_services

    work = Path(root or tempfile.mkdtemp(prefix="bench-reliability-", dir=cfg.storage.path()))
    cfg, keys, admin_key = bench_config(cfg, work)
    t0 = time.perf_counter()
    services = fresh_services(cfg)
    out: dict = {"requests": requests, "concurrency": concurrency, "max_tokens": max_tokens,
                 "student": cfg.student.name, "services_up_s": time.perf_counter() - t0, "scenarios": {}}
    scenarios = out["scenarios"]

    def step(name, fn, *args):
        print(f"[bench] reliability: {name}", flush=True)
        started = time.perf_counter()
        scenarios[name] = fn(*args)
        scenarios[name]["seconds"] = time.perf_counter() - started
        s = scenarios[name]
        print(f"[bench]   sent {s['sent']}, failed {s['failed']}, 5xx {s['status_5xx']}, lost {s['lost']}, "
              f"recover {s['recover_s'] if s['recover_s'] is None else round(s['recover_s'], 1)} s", flush=True)

    try:
        challenger = register_challenger(cfg, services)
        out["challenger"] = challenger["version"]
        step("load", scenario_load, cfg, services, keys, requests, concurrency, max_tokens)
        step("mixed_batches", scenario_mixed_batches, cfg, services, challenger["adapter_path"])
        step("bad_input", scenario_bad_input, cfg, services, keys, admin_key)
        step("bad_config", scenario_bad_config, work)
        step("isolation", scenario_isolation, cfg, services, keys, admin_key)
        step("fuzz", scenario_fuzz, cfg, services, keys, fuzz_examples)
        step("trace_writer_killed", scenario_trace_writer_killed, cfg, services, keys, fault_requests, concurrency,
             max_tokens)
        step("teacher_faults", scenario_teacher_faults, cfg, services, keys, label_prompts, concurrency, max_tokens)
        step("mlflow_unreachable", scenario_mlflow_unreachable, cfg, services, keys, fault_requests // 2,
             concurrency, max_tokens)
        step("disk_full_checkpoint", scenario_disk_full, cfg, services, keys)
        step("corrupt_artifacts", scenario_corrupt_artifacts, cfg, services, keys)
        step("engine_replica_killed", scenario_engine_killed, cfg, services, keys, fault_requests, concurrency,
             max_tokens)
        if "driver_killed" not in skip:
            step("driver_killed", scenario_driver_killed, cfg, services, keys, max_tokens)
        step("secrets_and_binding", scenario_secrets, cfg, services, keys, admin_key, dashboard)
    finally:
        stop_services(cfg)
    out["targets"] = {"load.status_5xx": "== 0", "*.lost": "== 0", "bad_input.kinds": ">= 25",
                      "isolation.failed": "== 0", "fuzz.status_5xx": "== 0",
                      "engine_replica_killed.unclean_failures": "== 0"}
    return out
