"""Rollout benchmark: from a checkpoint on disk to canary traffic, on the default student, three ways.

One run, one machine, the loop's own services (Ray Serve gateway, vLLM engines, MLflow registry,
rollout controller) on a scratch storage root, with the adapter a first cycle trains (cached by
benchmarks/common.py) and the draft co-trained on it:
  multi_lora  register the adapter in MLflow -> deploy it as challenger (admin path: aliases, rollout
              store) -> the first request of a challenger user answered by it through the gateway,
              hot-loaded onto the running multi-LoRA engine. `adapter_to_canary_s` (target < 10 s).
  merged      the gated path (merge, float64 proofs, the draft's acceptance, the gate, serving parity
              on vLLM) -> register -> deploy as challenger (a vLLM engine on the merged weights with
              the draft starts) -> the first challenger request. `gated_total_s` (target < 180 s).
  naive       a full redeploy: the gateway and the multi-LoRA engine deleted, then both deployed again
              (a fresh engine) serving the new version as champion -> its first answer. `redeploy_to_live_s`.
Each stage's seconds are in `stages_s`; the engine start of the merged path is its `deploy_s`.
"""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

from loop.config import LoopConfig, hash_api_key

KEY = "sk-bench-rollout"
LORA, MERGED = "bench-lora", "bench-merged"


def _config(cfg: LoopConfig, root: Path) -> LoopConfig:
    """The config's student and engine, two endpoints (one per backend) on a scratch storage root."""
    raw = cfg.model_dump()
    for role in ("student", "draft"):
        raw[role]["path"] = str(cfg.model_path(getattr(cfg, role)))
    raw["storage"] = {"root": str(root)}
    raw["tenants"] = [{"id": "bench", "api_key_hashes": [hash_api_key(KEY)], "sim_api_key_env": None,
                       "endpoints": [{"id": LORA, "backend": "multi_lora"}, {"id": MERGED, "backend": "merged"}]}]
    return LoopConfig.model_validate(raw)


def _challenger_user(rollout: dict) -> str:
    from loop.serving.routing import assign_variant

    return next(u for u in (f"bench-user-{i}" for i in range(1000)) if assign_variant(rollout, u) == "challenger")


def _first_answer(cfg: LoopConfig, endpoint: str, user: str, expect: str) -> float:
    """Seconds until the gateway answers `user` from version `expect` (polling, as a client retrying)."""
    import openai

    client = openai.OpenAI(base_url=f"http://{cfg.serving.host}:{cfg.serving.port}/v1", api_key=KEY,
                           max_retries=0, timeout=600)
    t0 = time.perf_counter()
    while True:
        raw = client.chat.completions.with_raw_response.create(
            model=f"model-{endpoint}", messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8, temperature=0, user=user)
        if raw.headers.get("x-model-version") == expect:
            return time.perf_counter() - t0
        time.sleep(0.05)


def _register(services, endpoint: str, adapter: Path, extra: dict) -> dict:
    """What the cycle's register stage does: the adapter logged as an MLflow artifact, a version with its tags."""
    from loop.models.digest import dir_digest

    lineage = services.lineage
    run_id = lineage.start_run(f"bench-{endpoint}", tags={"loop.endpoint": endpoint})
    lineage.log_artifacts(run_id, adapter, "adapter")
    info = lineage.register_version(endpoint, run_id, "adapter", {
        "parent_version": f"student-{endpoint}/1", "adapter_digest": dir_digest(adapter),
        "checkpoint_digest": dir_digest(adapter), "validation_verdict": "pass", **extra})
    lineage.end_run(run_id)
    return info


def _timed(stages: dict, name: str, fn):
    t = time.perf_counter()
    out = fn()
    stages[name] = time.perf_counter() - t
    return out


def run(cfg: LoopConfig) -> dict:
    import ray

    from benchmarks.common import gated_path, trained_adapter
    from loop.models.fetch import read_manifest
    from loop.cluster import admin, start_services, stop_services

    read_manifest(cfg.model_path(cfg.student))
    root = Path(tempfile.mkdtemp(prefix="bench-rollout-", dir=cfg.storage.path()))
    bench = _config(cfg, root)
    out: dict = {"student": cfg.student.name}
    try:
        print("[bench] 1/5 services: Ray, Serve, the multi-LoRA engine, the merged base's engine", flush=True)
        t0 = time.perf_counter()
        services = start_services(bench, epoch=1)
        out["services_up_s"] = time.perf_counter() - t0
        ray.get(services.rollout_controller.configure.remote(bench))
        adapter, trained_s = trained_adapter(cfg)
        out["adapter_trained_s"] = trained_s

        print("[bench] 2/5 multi_lora: adapter -> registered -> challenger -> first canary answer", flush=True)
        st: dict = {}
        info = _timed(st, "register_s", lambda: _register(services, LORA, adapter, {}))
        rollout = _timed(st, "deploy_s", lambda: admin(services, "deploy", LORA, version=info["number"],
                                                       weight=cfg.rollout.challenger_weight))
        st["first_canary_answer_s"] = _first_answer(bench, LORA, _challenger_user(rollout), info["version"])
        out["multi_lora"] = {"stages_s": st, "adapter_to_canary_s": sum(st.values())}

        print("[bench] 3/5 merged: the gated path (merge, proofs, draft acceptance, gate, parity)", flush=True)
        st = {}
        gated = gated_path(cfg, adapter, root / "gated")
        st.update({k: v for k, v in gated["stages_s"].items()})
        out["gate"] = {k: gated[k] for k in ("passed", "reasons", "candidate_acc", "champion_acc", "draft_acceptance",
                                              "engine_identical", "draft_trained_s")}
        print("[bench] 4/5 merged: registered -> challenger (its engine starts) -> first canary answer", flush=True)
        merged_dir, draft_dir = root / "gated" / "merged", gated["draft_dir"]
        info = _timed(st, "register_s", lambda: _register(services, MERGED, adapter, {
            "merged_path": str(merged_dir), "draft_path": str(draft_dir)}))
        rollout = _timed(st, "deploy_s", lambda: admin(services, "deploy", MERGED, version=info["number"],
                                                       weight=cfg.rollout.challenger_weight))
        st["first_canary_answer_s"] = _first_answer(bench, MERGED, _challenger_user(rollout), info["version"])
        out["merged"] = {"stages_s": st, "gated_total_s": sum(st.values())}

        print("[bench] 5/5 naive: the engine and gateway deleted, redeployed with the new version as champion",
              flush=True)
        from loop.cluster import ENGINE_APP, GATEWAY_APP, delete_apps, reconcile

        admin(services, "promote", LORA)
        delete_apps([GATEWAY_APP, ENGINE_APP], blocking=True)
        st = {}

        _timed(st, "redeploy_s", lambda: reconcile(services))
        st["first_answer_s"] = _first_answer(bench, LORA, "bench-user-0", f"student-{LORA}/2")
        out["naive"] = {"stages_s": st, "redeploy_to_live_s": sum(st.values())}
    finally:
        stop_services(bench)
        shutil.rmtree(root, ignore_errors=True)
    m, g, n = out["multi_lora"], out["merged"], out["naive"]
    out.update(adapter_to_canary_s=m["adapter_to_canary_s"], gated_total_s=g["gated_total_s"],
               redeploy_to_live_s=n["redeploy_to_live_s"],
               naive_over_multi_lora=n["redeploy_to_live_s"] / m["adapter_to_canary_s"],
               targets={"multi_lora.adapter_to_canary_s": "< 10", "merged.gated_total_s": "< 180",
                        "managed services (quoted)": "about 3600 s"})
    return out
