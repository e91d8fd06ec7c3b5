"""The loop's own faults: its driver killed in each stage, corrupt bases and adapters, bad configs."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

from pathlib import Path

from benchmarks.reliability.traffic import mixed_plan, send, tally, traced


DRIVER_KILLS = ["traffic@after", "label@after", "train@before", "merge@before", "draft@before", "validate@before",
                "register@after", "deploy@after", "canary@after", "evaluate@before"]


ROOT = Path(__file__).resolve().parents[2]


def driver(config: Path, env: dict, endpoint: str, kill: str | None = None, timeout_s: float = 900):
    """One start of the loop driver for one cycle of `endpoint`; with `kill` ("<stage>@before|after") it
    dies there like a kill -9 (LOOP_FAULT_KILL), leaving the cycle for the next start to resume.
    Returns returncode, stdout (with stderr), seconds, and up_s: start -> services up, cycle resuming."""
    from types import SimpleNamespace

    from loop.cycle.stages import FAULT_ENV

    env = {k: v for k, v in env.items() if k != FAULT_ENV} | ({FAULT_ENV: f"{endpoint}:{kill}"} if kill else {})
    started, lines, up_s = time.perf_counter(), [], None
    proc = subprocess.Popen([sys.executable, "jobs/run_loop.py", "--config", str(config), "--cycles", "1",
                             "--endpoint", endpoint], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=ROOT)
    watchdog = threading.Timer(timeout_s, proc.kill)
    watchdog.start()
    try:
        for line in proc.stdout:
            lines.append(line)
            if up_s is None and line.startswith("[loop] services up"):
                up_s = time.perf_counter() - started
        proc.wait()
    finally:
        watchdog.cancel()
    return SimpleNamespace(returncode=proc.returncode, stdout="".join(lines), stderr="", up_s=up_s,
                           seconds=time.perf_counter() - started)


def kill_driver_in_each_stage(config: Path, env: dict, endpoint: str, kills=DRIVER_KILLS) -> list[dict]:
    """The driver started once per entry of `kills`, killed there each time. Per start: the kill, the
    process, its seconds (and to services up), the endpoint's aliases after it, and whether the stage
    recorded a result."""
    from mlflow import MlflowClient

    from loop.config import load_config
    from loop.driver import next_cycle

    cfg = load_config(config)
    client = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri)
    cycle = cfg.storage.path("cycles", endpoint, f"cycle-{next_cycle(cfg, endpoint):04d}")
    runs = []
    for kill in kills:
        proc = driver(config, env, endpoint, kill)
        aliases = client.get_registered_model(f"student-{endpoint}").aliases
        runs.append({"kill": kill, "proc": proc, "seconds": proc.seconds, "up_s": proc.up_s,
                     "aliases": {k: int(v) for k, v in aliases.items()},
                     "done": (cycle / kill.split("@")[0] / "result.json").exists()})
    return runs


def scenario_driver_killed(cfg, services, keys, max_tokens) -> dict:
    """The loop driver killed in each stage of one cycle while users load the gateway (4 at a time): every start
    resumes where the last one died, serving never notices, one model version comes of it, and the
    champion stays until the promotion decides. `recover_s`: the longest restart -> services up and the
    cycle resuming."""
    import ray

    from loop.lineage.registry import registered_name

    endpoint, lineage = cfg.tenants[0].endpoints[0].id, services.lineage
    raw = cfg.model_dump(mode="json")
    raw["ray"]["address"] = ray.get_runtime_context().gcs_address  # the drivers join this cluster
    raw["draft_training"]["max_steps"] = 10  # cheaper knobs, as test_resume: the faults are the point
    raw["promotion"]["canary_rounds"] = 6
    raw["validation"].update(parity_questions=0, spec_check_questions=0)
    config = cfg.storage.path("driver-killed.yaml")
    config.write_text(json.dumps(raw))
    env = dict(os.environ) | {t.sim_api_key_env: keys[t.id] for t in cfg.tenants if t.sim_api_key_env}
    champion = lineage.version_info(endpoint, "champion")["number"]
    before = lineage.versions(endpoint)
    outcomes, stop = [], threading.Event()

    def users():  # steady traffic across every restart
        seed = 100
        while not stop.is_set():
            outcomes.extend(send(services.gateway_url, mixed_plan(keys, cfg, 16, seed=seed), 4, max_tokens))
            seed += 1

    load = threading.Thread(target=users)
    load.start()
    try:
        runs = kill_driver_in_each_stage(config, env, endpoint)
        final = driver(config, env, endpoint)
    finally:
        stop.set()
        load.join()
    ids, dup = traced(cfg)
    result = tally(outcomes, ids)
    aliases = lineage.client.get_registered_model(registered_name(endpoint)).aliases
    new = [v for v in lineage.versions(endpoint) if v not in before]
    landed = [r for r in runs if r["proc"].returncode == 137 and "[fault] killing the driver" in r["proc"].stdout
              and not r["done"]]
    early = [r["kill"] for r in runs[:DRIVER_KILLS.index("deploy@after")] if r["aliases"].get("champion") != champion]
    ups = [r["up_s"] for r in runs if r["up_s"] is not None]
    result.update(recover_s=max(ups) if ups else None, duplicated=dup, kills=len(runs),
                  kills_landed_in_stage=len(landed), final_exit=final.returncode, final_s=final.seconds,
                  new_versions=len(new), champion_changed_before_promotion=early,
                  champion_after=int(aliases["champion"]), restart_seconds=[round(r["seconds"], 1) for r in runs])
    if final.returncode != 0:
        result["final_tail"] = final.stdout[-3000:]
    result["lost"] += abs(len(new) - 1) + len(early) + (len(runs) - len(landed))
    return result


def _corrupt_adapter(base: Path, out: Path, how: str) -> Path:
    """A LoRA adapter for `base` damaged as `how`: NaN weights, a truncated file, or shapes of another model."""
    from safetensors.torch import load_file, save_file

    from benchmarks.serving import make_adapter

    make_adapter(base, out, 8, seed=3, std=0.05)
    f = out / "adapter_model.safetensors"
    if how == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
        return out
    tensors = load_file(f)
    if how == "nan":
        tensors[next(k for k in tensors if "lora_B" in k)][:] = float("nan")
    else:  # other-model: lora_A of twice the base's hidden size
        tensors = {k: v.repeat(1, 2) if "lora_A" in k else v for k, v in tensors.items()}
    save_file(tensors, f)
    return out


def flip_a_byte(path: Path) -> None:
    with open(path, "r+b") as f:
        f.seek(-3, os.SEEK_END)
        byte = f.read(1)
        f.seek(-3, os.SEEK_END)
        f.write(bytes([byte[0] ^ 0xFF]))


def scenario_corrupt_artifacts(cfg, services, keys) -> dict:
    """Corrupt models never reach an engine. A base whose files changed since `loopctl models fetch` is
    refused by the start check; adapters of NaNs, truncated, or shaped for another model fail the merge
    stage's proofs (verdict and reasons in MLflow, nothing registered); an adapter damaged on disk after
    registration is refused at deploy (409, the reason tagged on the version in MLflow)."""
    from benchmarks.serving import make_adapter
    from loop.cycle import Cycle, learn
    from loop.cycle.results import MergeResult, TrainResult
    from loop.lineage.registry import registered_name
    from loop.models.digest import dir_digest
    from loop.driver import check_models
    from loop.models.fetch import ModelDamaged
    from loop.serving.rollouts import AdminError
    from loop.cluster import admin

    endpoint, lineage = cfg.tenants[0].endpoints[0], services.lineage
    base, work = cfg.model_path(cfg.student), cfg.storage.path("corrupt")
    before = lineage.versions(endpoint.id)
    aliases = lineage.client.get_registered_model(registered_name(endpoint.id)).aliases
    cases = []

    damaged = work / "base"
    shutil.copytree(base, damaged)
    flip_a_byte(next(damaged.glob("*.safetensors")))
    student = cfg.student.model_copy(update={"path": str(damaged)})
    try:
        check_models(cfg.model_copy(update={"student": student}))
        cases.append({"kind": "base-bytes-changed", "refused": False})
    except ModelDamaged as e:
        runs = lineage.client.search_runs([lineage.experiment_id], "tags.`loop.stage` = 'preflight'")
        cases.append({"kind": "base-bytes-changed", "refused": True, "at": "start check", "reason": str(e),
                      "in_mlflow": any(r.data.tags.get("refused") == str(e) for r in runs)})

    for i, how in enumerate(("nan", "truncated", "other-model")):
        cycle = Cycle(cfg, services, endpoint, 80 + i, keys[cfg.tenants[0].id], progress=lambda m: None)
        cycle.report.run_id = lineage.start_run(f"corrupt-adapter-{how}")
        adapter = _corrupt_adapter(base, work / f"adapter-{how}", how)
        trained = TrainResult(adapter_dir=str(adapter), adapter_digest="", parent={}, run_id="")
        result = cycle.stage("merge", MergeResult, lambda c, d, r: learn.merge(c, d, r, trained))
        run = lineage.client.search_runs([lineage.experiment_id],
                                         f"tags.`mlflow.parentRunId` = '{cycle.report.run_id}'")[0]
        logged = json.loads(open(lineage.client.download_artifacts(run.info.run_id, "merge_report.json",
                                                                   str(cycle.ctx.dir))).read())
        lineage.end_run(cycle.report.run_id, ok=False)
        cases.append({"kind": f"adapter-{how}", "refused": result.passed is False, "at": "merge proofs",
                      "reason": "; ".join(result.reasons),
                      "in_mlflow": run.data.tags.get("verdict") == "fail" and logged["reasons"] == result.reasons,
                      "merged_left": (cycle.ctx.dir / "merge" / "merged").exists()})

    adapter = make_adapter(base, work / "adapter-registered", cfg.training.lora_rank, seed=4)
    run = lineage.start_run("corrupt-after-registration")
    lineage.log_artifacts(run, adapter, "adapter")
    info = lineage.register_version(endpoint.id, run, "adapter", {
        "adapter_digest": dir_digest(adapter), "training_run_id": run, "validation_verdict": "pass"})
    flip_a_byte(Path(info["adapter_path"]) / "adapter_model.safetensors")
    try:
        admin(services, "deploy", endpoint.id, version=info["number"], role="challenger", weight=0.5, by="bench")
        cases.append({"kind": "adapter-changed-after-registration", "refused": False})
    except AdminError as e:
        tags = lineage.client.get_model_version(registered_name(endpoint.id), str(info["number"])).tags
        cases.append({"kind": "adapter-changed-after-registration", "refused": e.status == 409, "at": "deploy",
                      "reason": e.message, "in_mlflow": bool(tags.get("deploy_refused"))})
    registered = len(lineage.versions(endpoint.id)) - len(before) - 1  # the one damaged after registration
    served = lineage.client.get_registered_model(registered_name(endpoint.id)).aliases != aliases
    refused = sum(c["refused"] for c in cases)
    return {"sent": len(cases), "failed": len(cases) - refused, "status_5xx": 0,
            "lost": (len(cases) - refused) + registered + int(served), "recover_s": 0.0, "refused": refused,
            "reasons_in_mlflow": sum(c.get("in_mlflow", False) for c in cases), "versions_registered": registered,
            "aliases_changed": served, "cases": cases}


def _teacher_openai(r):
    r.setdefault("teacher", {}).update(kind="openai")


BAD_CONFIGS = [  # (kind, change to configs/tiny.yaml, what the one-line error must say)
    ("section missing", lambda r: r.pop("student"), "student: Field required"),
    ("lora rank over the engine's", lambda r: r["training"].update(lora_rank=64),
     "raise max_lora_rank or lower lora_rank"),
    ("plaintext api key", lambda r: r["tenants"][0].update(api_key_hashes=["plaintext-key"]),
     "tenants[0].api_key_hashes"),
    ("bad endpoint id", lambda r: r["tenants"][0]["endpoints"][0].update(id="Bad_ID"), "tenants[0].endpoints[0].id"),
    ("negative learning rate", lambda r: r["training"].update(learning_rate=-1), "training.learning_rate"),
    ("gpu memory over 1", lambda r: r["serving"]["engine"].update(gpu_memory_utilization=3),
     "serving.engine.gpu_memory_utilization"),
    ("unknown section", lambda r: r.update(unknown_section={}), "unknown_section: Extra inputs are not permitted"),
    ("openai teacher without url", _teacher_openai, "teacher.base_url is required"),
    ("duplicate endpoint ids", lambda r: r["tenants"].append(dict(r["tenants"][0], id="copy")),
     "must be unique across tenants"),
    ("cpu loras under gpu loras", lambda r: r["serving"]["engine"].update(max_loras=8, max_cpu_loras=2),
     "max_cpu_loras (2) must be at least"),
    ("unknown training strategy", lambda r: r["training"].update(strategy="fsdp"), "training.strategy"),
    ("ewc without replay", lambda r: r["training"].update(regularizer="ewc", replay_ratio=0),
     "set training.replay_ratio > 0"),
    ("regularizer under zero-3", lambda r: r["training"].update(strategy="deepspeed", zero_stage=3, regularizer="l2",
                                                                reg_weight=0.1), "use training.zero_stage 2"),
    ("local teacher without path", lambda r: r.update(teacher={"kind": "local"}),
     "teacher.path (a Hugging Face model directory) is required"),
    ("cascade to a local teacher", lambda r: (r.update(teacher={"kind": "local", "path": "models/teacher"}),
                                              r["tenants"][0]["endpoints"][0].update(
                                                  cascade={"min_mean_logprob": -1.0})),
     "a local teacher has no endpoint"),
    ("cascade threshold out of range", lambda r: r["tenants"][1]["endpoints"][0].update(
        cascade={"min_mean_logprob": 2}), "tenants[1].endpoints[0].cascade.min_mean_logprob"),
]


def scenario_bad_config(work: Path) -> dict:
    """Each of BAD_CONFIGS, and a file that is not YAML, not a mapping, or not there: `load_config` (what
    `loopctl config check`, `run` and the jobs call first) fails with lines naming the field and the fix."""
    import yaml

    from loop.config import ConfigError, load_config

    base = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    cases = []
    for kind, change, expected in [*BAD_CONFIGS, ("not yaml", "name: [unclosed", "not valid YAML"),
                                   ("not a mapping", "- a\n- list", "top level must be a mapping"),
                                   ("no such file", None, "no such config file")]:
        path = work / "bad-configs" / f"{len(cases):02d}.yaml"
        path.parent.mkdir(parents=True, exist_ok=True)
        if callable(change):
            raw = yaml.safe_load(base.read_text())
            change(raw)
            path.write_text(yaml.safe_dump(raw))
        elif change is not None:
            path.write_text(change)
        try:
            load_config(path)
            cases.append({"kind": kind, "refused": False, "message": ""})
        except ConfigError as e:
            cases.append({"kind": kind, "refused": expected in str(e), "message": str(e)})
    wrong = [c for c in cases if not c["refused"]]
    return {"sent": len(cases), "failed": len(wrong), "status_5xx": 0, "lost": 0, "recover_s": 0.0,
            "kinds": len(cases), "wrong": wrong, "cases": cases}
