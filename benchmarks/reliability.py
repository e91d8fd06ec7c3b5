"""Reliability and security of the running stack, with figures: load held, faults survived, bad input
refused, tenants isolated. `loopctl bench reliability --config configs/tiny.yaml` (two tenants needed).

Everything is real: the gateway (Ray Serve), the multi-LoRA vLLM engine, the trace writer actor, the
reference teacher, MLflow. Each scenario in `scenarios` has `sent`, `failed`, `status_5xx`, `lost`
(answered requests with no trace record, labels neither made nor recorded as failed, registered
partial checkpoints: must be 0) and `recover_s` (fault -> first success after it; 0 when nothing broke).
"""
from __future__ import annotations

import asyncio
import errno
import json
import os
import random
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from loop.config import ConfigError, LoopConfig, hash_api_key

QUESTION = "What does the Zentrix router cost?"


# --- the bench's own loop state and keys ------------------------------------------------------
def bench_config(cfg: LoopConfig, root: Path) -> tuple[LoopConfig, dict[str, str], str]:
    """`cfg` with fresh keys per tenant and for admin (only their hashes in the config), storage under
    `root` (the models stay where they are). Returns (config, {tenant: key}, admin key)."""
    if len(cfg.tenants) < 2:
        raise ConfigError(f"the reliability bench needs two tenants; {len(cfg.tenants)} in this config: "
                          "use --config configs/tiny.yaml")
    keys = {t.id: f"sk-rel-{t.id}-{secrets.token_hex(12)}" for t in cfg.tenants}
    admin = f"sk-rel-admin-{secrets.token_hex(12)}"
    raw = cfg.model_dump(mode="json")
    for section in ("student", "draft"):
        raw[section]["path"] = str(cfg.model_path(getattr(cfg, section)))
    raw["storage"]["root"] = str(root)
    raw["storage"]["mlflow_tracking_uri"] = None
    for t in raw["tenants"]:
        t["api_key_hashes"] = [hash_api_key(keys[t["id"]])]
    raw["serving"]["admin_key_hash"] = hash_api_key(admin)
    return LoopConfig.model_validate(raw), keys, admin


def fresh_services(cfg: LoopConfig):
    """The loop's services for `cfg`, replacing any gateway, engine or teacher already on the cluster."""
    from ray import serve

    from loop.services import init_ray, start_services
    from serve_apps.gateway_app import APP_NAME, ENGINE_APP
    from serve_apps.teacher_app import APP_NAME as TEACHER_APP

    init_ray(cfg)
    try:
        running = set(serve.status().applications)
    except Exception:  # noqa: BLE001 - Serve not started on this cluster: nothing to replace
        running = set()
    for app in (APP_NAME, ENGINE_APP, TEACHER_APP):
        if app in running:
            serve.delete(app)
    return start_services(cfg, epoch=1)


# --- traffic ------------------------------------------------------------------------------------
class Outcome:
    __slots__ = ("status", "request_id", "latency_s", "stream", "clean", "answered", "at")

    def __init__(self, status, request_id, latency_s, stream, clean, answered, at):
        self.status, self.request_id, self.latency_s, self.stream = status, request_id, latency_s, stream
        self.clean, self.answered, self.at = clean, answered, at  # `at`: when the answer came back

    @property
    def started(self) -> float:
        return self.at - self.latency_s


def _openai_error(body: dict) -> bool:
    err = body.get("error") if isinstance(body, dict) else None
    return isinstance(err, dict) and bool(err.get("message")) and bool(err.get("type")) and "param" in err


async def _one(client, url: str, key: str, model: str, user: str, stream: bool, max_tokens: int) -> Outcome:
    """One chat request; `clean` is True for a 200, or an error in OpenAI's format (a 503 with a retry hint)."""
    body = {"model": model, "messages": [{"role": "user", "content": QUESTION}], "max_tokens": max_tokens,
            "user": user, "stream": stream, "temperature": 0}
    headers = {"Authorization": f"Bearer {key}"}
    t0 = time.perf_counter()
    try:
        if stream:
            async with client.stream("POST", f"{url}/chat/completions", json=body, headers=headers) as r:
                raw = (await r.aread()).decode(errors="replace")
            status, rid = r.status_code, r.headers.get("x-request-id", "")
            events = [line[6:] for line in raw.splitlines() if line.startswith("data: ")]
            errored = any('"error"' in e for e in events)
            answered = status == 200 and events[-1:] == ["[DONE]"] and not errored
            if status == 200 and not answered:
                status = 503  # the stream broke in-band: counted as a failure of the engine
            clean = answered or (errored and status == 503) or _retry_hinted(r, raw)
        else:
            r = await client.post(f"{url}/chat/completions", json=body, headers=headers)
            status, rid = r.status_code, r.headers.get("x-request-id", "")
            answered = status == 200 and bool(r.json()["choices"][0]["message"]["content"] is not None)
            clean = answered or _retry_hinted(r, r.text)
    except Exception:  # noqa: BLE001 - a dropped connection is the worst outcome: counted, never clean
        return Outcome(0, "", time.perf_counter() - t0, stream, False, False, time.time())
    return Outcome(status, rid, time.perf_counter() - t0, stream, clean, answered, time.time())


def _retry_hinted(r, text: str) -> bool:
    """A server error the client can act on: OpenAI's error body, and a Retry-After on a 503."""
    try:
        body = json.loads(text)
    except ValueError:
        return False
    return _openai_error(body) and (r.status_code != 503 or "retry-after" in r.headers)


def send(url: str, plan: list[tuple[str, str, str, bool]], concurrency: int, max_tokens: int,
         during=None) -> list[Outcome]:
    """Send `plan` ((key, model, user, stream) per request) `concurrency` at a time; `during(sent_so_far)`
    is called from the event loop after each request starts (a fault injected mid-load)."""
    import httpx

    async def main():
        gate = asyncio.Semaphore(concurrency)
        started = 0
        async with httpx.AsyncClient(timeout=180, limits=httpx.Limits(max_connections=concurrency)) as client:
            async def job(item):
                nonlocal started
                async with gate:
                    started += 1
                    if during:
                        await during(started)
                    return await _one(client, url, *item, max_tokens=max_tokens)

            return list(await asyncio.gather(*(job(p) for p in plan)))

    return asyncio.run(main())


def mixed_plan(keys: dict[str, str], cfg: LoopConfig, n: int, seed: int = 0) -> list[tuple[str, str, str, bool]]:
    """n requests over every tenant's endpoints, a third of them streamed, 64 sticky users."""
    rng = random.Random(seed)
    targets = [(keys[t.id], e.model_name) for t in cfg.tenants for e in t.endpoints]
    return [(*rng.choice(targets), f"user-{rng.randrange(64)}", i % 3 == 0) for i in range(n)]


def tally(outcomes: list[Outcome], traced_ids: set[str], fault_at: float | None = None) -> dict:
    answered = [o for o in outcomes if o.answered]
    lat = sorted(o.latency_s * 1000 for o in answered)
    # Recovered: the first answer to a request sent after the fault (in-flight ones may finish anyway).
    after = [o.at for o in answered if fault_at is not None and o.started > fault_at]
    return {
        "sent": len(outcomes), "answered": len(answered), "failed": len(outcomes) - len(answered),
        "status_5xx": sum(500 <= o.status < 600 for o in outcomes),
        "unclean_failures": sum(not o.clean for o in outcomes),
        "lost": sum(o.request_id not in traced_ids for o in answered),
        "streamed": sum(o.stream for o in outcomes),
        "p50_ms": statistics.median(lat) if lat else None,
        "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] if lat else None,
        "recover_s": (min(after) - fault_at) if after else (0.0 if fault_at is None else None),
    }


def traced(cfg: LoopConfig) -> tuple[set[str], int]:
    """Request ids in the trace log as the loop reads it, and how many of them appear twice there."""
    from collections import Counter

    from loop.traces.log import read_traces

    counts = Counter(r["request_id"] for r in read_traces(cfg.storage.path("traces")))
    return set(counts), sum(c - 1 for c in counts.values() if c > 1)


# --- scenarios ------------------------------------------------------------------------------------
def scenario_load(cfg, services, keys, n, concurrency, max_tokens) -> dict:
    out = send(services.gateway_url, mixed_plan(keys, cfg, n), concurrency, max_tokens)
    ids, dup = traced(cfg)
    result = tally(out, ids)
    variants = _variants_seen(cfg, {o.request_id for o in out})
    result.update(duplicated=dup, variants_served=variants)
    return result


def _variants_seen(cfg, ids: set[str]) -> dict:
    from collections import Counter

    from loop.traces.log import read_traces

    return dict(Counter(f"{r['endpoint']}:{r['variant']}" for r in read_traces(cfg.storage.path("traces"))
                        if r["request_id"] in ids))


def _kill_once(at_request: int, kill):
    state = {"at": None}

    async def during(started: int):
        if started == at_request and state["at"] is None:
            state["at"] = time.time()
            await asyncio.get_running_loop().run_in_executor(None, kill)

    return during, state


def _engine_replica():
    import ray

    from serve_apps.gateway_app import ENGINE_APP

    names = ray.util.list_named_actors(all_namespaces=True)
    for a in names:
        if "REPLICA" in a["name"] and f"{ENGINE_APP}#" in a["name"]:
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise RuntimeError(f"no replica of {ENGINE_APP} among the named actors: {[a['name'] for a in names]}")


def scenario_engine_killed(cfg, services, keys, n, concurrency, max_tokens) -> dict:
    """The engine replica dies a third of the way in; Serve starts a new one."""
    import ray

    during, state = _kill_once(n // 3, lambda: ray.kill(_engine_replica(), no_restart=True))
    out = send(services.gateway_url, mixed_plan(keys, cfg, n, seed=1), concurrency, max_tokens, during)
    ids, dup = traced(cfg)
    result = tally(out, ids, state["at"])
    result["duplicated"] = dup
    if result["recover_s"] is None:  # nothing answered after the kill within the load: wait for it
        result["recover_s"] = _first_success_after(services.gateway_url, keys, cfg, state["at"])
    from loop.serving.engine import kill_orphaned_engines

    result["orphaned_engine_processes_ended"] = kill_orphaned_engines()
    return result


def _first_success_after(url, keys, cfg, since: float, timeout_s: float = 300) -> float | None:
    plan = mixed_plan(keys, cfg, 1, seed=7)
    while time.time() - since < timeout_s:
        if send(url, plan, 1, 4)[0].answered:
            return time.time() - since
        time.sleep(1)
    return None


def scenario_trace_writer_killed(cfg, services, keys, n, concurrency, max_tokens) -> dict:
    """The trace writer actor dies mid-load; Ray restarts it, it replays its write-ahead log, and the
    gateway's appends are retried (read back once: a retried append is the same record)."""
    import ray

    during, state = _kill_once(n // 3, lambda: ray.kill(services.trace_log, no_restart=False))
    out = send(services.gateway_url, mixed_plan(keys, cfg, n, seed=2), concurrency, max_tokens, during)
    ids, dup = traced(cfg)
    result = tally(out, ids, state["at"])
    result["duplicated"] = dup
    return result


class FlakyTeacher:
    """An OpenAI-compatible proxy in front of the reference teacher: `fail` of the calls get a 500,
    `slow` of them hang past the client's timeout; the rest are forwarded."""

    def __init__(self, upstream: str, fail: float, slow: float, hang_s: float, seed: int = 0):
        import httpx

        rng, lock, stats = random.Random(seed), threading.Lock(), {"calls": 0, "500": 0, "timeout": 0}
        self.stats = stats

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers["content-length"]))
                with lock:
                    stats["calls"] += 1
                    roll = rng.random()
                if roll < fail:
                    with lock:
                        stats["500"] += 1
                    return self._send(500, b'{"error": {"message": "injected", "type": "server_error"}}')
                if roll < fail + slow:
                    with lock:
                        stats["timeout"] += 1
                    time.sleep(hang_s)
                    return None
                r = httpx.post(upstream + self.path[len("/v1"):], content=body,
                               headers={"content-type": "application/json"}, timeout=60)
                self._send(r.status_code, r.content)

            def _send(self, status, data):
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


def scenario_teacher_faults(cfg, services, keys, n_labels, concurrency, max_tokens) -> dict:
    """Labelling through a teacher that fails 30% of calls (15% 500s, 15% timeouts), while users load
    the gateway: labels complete with retries, the rest are recorded as failures, serving is untouched."""
    from loop.sim.world import World
    from loop.teacher.calls import label

    proxy = FlakyTeacher(services.teacher_url, fail=0.15, slow=0.15, hang_s=2.5)
    t = cfg.teacher.model_copy(update={"kind": "openai", "base_url": proxy.url, "timeout_s": 1.0,
                                       "max_retries": 4, "cache": False})
    lcfg = cfg.model_copy(update={"teacher": t})
    w = cfg.world
    facts = World(w.seed, 1, w.num_entities, w.drift_fraction, w.new_per_epoch).facts
    questions = [q for f in facts for q in f.train_questions()]
    prompts = [json.dumps([{"role": "user", "content": f"{questions[i % len(questions)]} (#{i})"}])
               for i in range(n_labels)]
    box: dict = {}

    def labelling():
        box["rows"] = label(lcfg, proxy.url, 1, prompts)

    worker = threading.Thread(target=labelling)
    started = time.time()
    worker.start()
    out = send(services.gateway_url, mixed_plan(keys, cfg, 200, seed=3), concurrency, max_tokens)
    worker.join()
    proxy.close()
    rows = box.get("rows", [])
    failed = [r for r in rows if r.get("label_error")]
    ids, _ = traced(cfg)
    serving = tally(out, ids)
    got = {r["messages"] for r in rows}
    return {"sent": len(prompts), "failed": len(failed), "status_5xx": proxy.stats["500"],
            "lost": sum(p not in got for p in prompts), "recover_s": 0.0,
            "labelled": len(rows) - len(failed), "teacher_calls": proxy.stats["calls"],
            "injected_500": proxy.stats["500"], "injected_timeouts": proxy.stats["timeout"],
            "label_seconds": time.time() - started, "failures_recorded": all(r["label_error"] for r in failed),
            "serving_during": {k: serving[k] for k in ("sent", "failed", "status_5xx", "lost", "p50_ms", "p99_ms")}}


def scenario_mlflow_unreachable(cfg, services, keys, n, concurrency, max_tokens) -> dict:
    """MLflow as a tracking server, stopped for a while: the loop's lineage calls wait (bounded) and
    then stop with one line naming the server; serving is unaffected; after a restart the wait ends."""
    from loop.lineage.registry import Lineage, LineageUnavailable

    port = _free_port()
    db = cfg.storage.path("mlflow-server.db")
    uri = f"http://127.0.0.1:{port}"

    def server():
        return subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{db}",
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    proc = server()
    lineage = Lineage(uri, cfg.storage.path("mlartifacts-server"))
    lineage.wait_reachable(120)
    proc.terminate()
    proc.wait(30)
    down_at = time.time()
    t0 = time.perf_counter()
    try:
        lineage.wait_reachable(5)
        stopped = "no error: MLflow still answered"
    except LineageUnavailable as e:
        stopped = str(e)
    stop_s = time.perf_counter() - t0
    out = send(services.gateway_url, mixed_plan(keys, cfg, n, seed=4), concurrency, max_tokens)
    proc = server()
    try:
        lineage.wait_reachable(120)
        recover = time.time() - down_at
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        import mlflow

        mlflow.set_tracking_uri(cfg.storage.tracking_uri)  # Lineage() set the process-wide URI to the server
    ids, _ = traced(cfg)
    result = tally(out, ids)
    result.update(recover_s=recover, loop_stopped_with=stopped, loop_stop_s=stop_s)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario_disk_full(cfg, services, keys) -> dict:
    """The train stage writes its checkpoint onto a filesystem with a few KB left: the stage fails with
    one line, leaves no partial adapter and no result, and nothing is registered."""
    from loop.cycle import Cycle, CycleFailed
    from loop.sim.world import World, training_rows

    endpoint = cfg.tenants[0].endpoints[0]
    tcfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 3})})
    cycle = Cycle(tcfg, services, endpoint, 90, keys[cfg.tenants[0].id], progress=lambda m: None)
    cycle.report.run_id = services.lineage.start_run("disk-full")
    sdir = cycle.dir / "train"
    sdir.mkdir(parents=True, exist_ok=True)
    w = cfg.world
    dataset = cycle.dir / "train.jsonl"
    dataset.write_text("".join(json.dumps(r) + "\n" for r in training_rows(
        World(w.seed, 1, w.num_entities, w.drift_fraction, w.new_per_epoch).facts)))
    before = services.lineage.versions(endpoint.id)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(sdir)], capture_output=True)
    if mounted.returncode != 0:
        return {"sent": 0, "failed": 0, "status_5xx": 0, "lost": 0, "recover_s": 0.0,
                "skipped": f"cannot mount a small filesystem here: {mounted.stderr.decode().strip()}"}
    try:
        _fill(sdir, keep_bytes=8 << 10)
        try:
            cycle.stage("train", lambda d, r: cycle._train(d, r, {"dataset": str(dataset), "replay": None}))
            message = "no error"
        except CycleFailed as e:
            message = str(e)
        partial = [p.name for p in sdir.iterdir() if p.name != "filler"]
    finally:
        subprocess.run(["umount", "-l", str(sdir)], capture_output=True)
    after = services.lineage.versions(endpoint.id)
    registered = len(after) - len(before)
    return {"sent": 1, "failed": int(message != "no error"), "status_5xx": 0,
            "lost": registered + len(partial), "recover_s": 0.0, "error": message,
            "partial_files": partial, "versions_registered": registered}


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


def _flip_a_byte(path: Path) -> None:
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
    from loop.cycle import Cycle
    from loop.lineage.registry import registered_name
    from loop.models.digest import dir_digest
    from loop.driver import check_models
    from loop.models.fetch import ModelDamaged
    from loop.serving.admin import AdminError
    from loop.services import admin

    endpoint, lineage = cfg.tenants[0].endpoints[0], services.lineage
    base, work = cfg.model_path(cfg.student), cfg.storage.path("corrupt")
    before = lineage.versions(endpoint.id)
    aliases = lineage.client.get_registered_model(registered_name(endpoint.id)).aliases
    cases = []

    damaged = work / "base"
    shutil.copytree(base, damaged)
    _flip_a_byte(next(damaged.glob("*.safetensors")))
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
        result = cycle.stage("merge", lambda d, r: cycle._merge(d, r, {"adapter_dir": str(adapter)}))
        run = lineage.client.search_runs([lineage.experiment_id],
                                         f"tags.`mlflow.parentRunId` = '{cycle.report.run_id}'")[0]
        logged = json.loads(open(lineage.client.download_artifacts(run.info.run_id, "merge_report.json",
                                                                   str(cycle.dir))).read())
        lineage.end_run(cycle.report.run_id, ok=False)
        cases.append({"kind": f"adapter-{how}", "refused": result["passed"] is False, "at": "merge proofs",
                      "reason": "; ".join(result["reasons"]),
                      "in_mlflow": run.data.tags.get("verdict") == "fail" and logged["reasons"] == result["reasons"],
                      "merged_left": (cycle.dir / "merge" / "merged").exists()})

    adapter = make_adapter(base, work / "adapter-registered", cfg.training.lora_rank, seed=4)
    run = lineage.start_run("corrupt-after-registration")
    lineage.log_artifacts(run, adapter, "adapter")
    info = lineage.register_version(endpoint.id, run, "adapter", {
        "adapter_digest": dir_digest(adapter), "training_run_id": run, "validation_verdict": "pass"})
    _flip_a_byte(Path(info["adapter_path"]) / "adapter_model.safetensors")
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
    return {"sent": len(cases), "failed": refused, "status_5xx": 0,
            "lost": (len(cases) - refused) + registered + int(served), "recover_s": 0.0, "refused": refused,
            "reasons_in_mlflow": sum(c.get("in_mlflow", False) for c in cases), "versions_registered": registered,
            "aliases_changed": served, "cases": cases}


def _fill(path: Path, keep_bytes: int) -> None:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - keep_bytes))


def bad_requests(keys: dict[str, str], models: dict[str, str]) -> list[tuple[str, str, str, bytes, dict, int]]:
    """(kind, method, route, body, headers, expected status) for malformed and hostile requests."""
    (t1, k1), (t2, _) = list(keys.items())[:2]
    mine, theirs = models[t1], models[t2]
    auth = {"Authorization": f"Bearer {k1}", "content-type": "application/json"}

    def chat(**fields):
        body = {"model": mine, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
        body.update(fields)
        return json.dumps({k: v for k, v in body.items() if v is not ...}).encode()

    c, p = "/v1/chat/completions", "/v1/completions"
    return [
        ("invalid JSON", "POST", c, b"{not json", auth, 400),
        ("JSON array body", "POST", c, b"[1, 2]", auth, 400),
        ("empty body", "POST", c, b"", auth, 400),
        ("invalid UTF-8", "POST", c, b'{"model": "\xff\xfe", "messages": []}', auth, 400),
        ("missing messages", "POST", c, chat(messages=...), auth, 400),
        ("messages not a list", "POST", c, chat(messages="hi"), auth, 400),
        ("empty messages", "POST", c, chat(messages=[]), auth, 400),
        ("unknown role", "POST", c, chat(messages=[{"role": "wizard", "content": "x"}]), auth, 400),
        ("content not a string", "POST", c, chat(messages=[{"role": "user", "content": 42}]), auth, 400),
        ("message without content", "POST", c, chat(messages=[{"role": "user"}]), auth, 400),
        ("negative max_tokens", "POST", c, chat(max_tokens=-5), auth, 400),
        ("zero max_tokens", "POST", c, chat(max_tokens=0), auth, 400),
        ("huge max_tokens", "POST", c, chat(max_tokens=10 ** 12), auth, 400),
        ("max_tokens a string", "POST", c, chat(max_tokens="ten"), auth, 400),
        ("temperature too high", "POST", c, chat(temperature=9), auth, 400),
        ("negative temperature", "POST", c, chat(temperature=-1), auth, 400),
        ("top_p zero", "POST", c, chat(top_p=0), auth, 400),
        ("top_p above one", "POST", c, chat(top_p=1.5), auth, 400),
        ("n above one", "POST", c, chat(n=3), auth, 400),
        ("stream not a boolean", "POST", c, chat(stream="yes please"), auth, 400),
        ("stream_options not an object", "POST", c, chat(stream=True, stream_options="all"), auth, 400),
        ("stream_options unknown field", "POST", c, chat(stream=True, stream_options={"bogus": 1}), auth, 400),
        ("user id too long", "POST", c, chat(user="u" * 1000), auth, 400),
        ("seed not an integer", "POST", c, chat(seed="abc"), auth, 400),
        ("unknown model", "POST", c, chat(model="model-nope"), auth, 404),
        ("another tenant's model", "POST", c, chat(model=theirs), auth, 404),
        ("path traversal in model id", "POST", c, chat(model="../../../etc/passwd"), auth, 404),
        ("injection in model id", "POST", c, chat(model="model-x'; DROP TABLE traces;--"), auth, 404),
        ("null byte in model id", "POST", c, chat(model="model-\u0000/../x"), auth, 404),
        ("model id too long", "POST", c, chat(model="m" * 5000), auth, 400),
        ("prompt over the context", "POST", c, chat(messages=[{"role": "user", "content": "word " * 3000}]), auth, 400),
        ("oversized body", "POST", c, chat(messages=[{"role": "user", "content": "x" * (2 << 20)}]), auth, 413),
        ("completion without prompt", "POST", p, json.dumps({"model": mine}).encode(), auth, 400),
        ("completion with empty prompt", "POST", p, json.dumps({"model": mine, "prompt": ""}).encode(), auth, 400),
        ("missing API key", "POST", c, chat(), {"content-type": "application/json"}, 401),
        ("wrong API key", "POST", c, chat(), {**auth, "Authorization": "Bearer sk-wrong"}, 401),
        ("feedback without request_id", "POST", "/v1/feedback", b'{"score": 1}', auth, 400),
        ("feedback score not a number", "POST", "/v1/feedback", b'{"request_id": "x", "score": "high"}', auth, 400),
        ("admin deploy: path traversal as model", "POST", "/admin/deploy",
         json.dumps({"model": "../../etc", "version": 2}).encode(), "ADMIN", 404),
        ("admin deploy: adapter path as version", "POST", "/admin/deploy",
         json.dumps({"model": mine, "version": "../../../tmp/evil-adapter"}).encode(), "ADMIN", 400),
        ("admin deploy: unknown version", "POST", "/admin/deploy",
         json.dumps({"model": mine, "version": 999}).encode(), "ADMIN", 404),
        ("admin: unknown action", "POST", "/admin/format-disk", json.dumps({"model": mine}).encode(), "ADMIN", 400),
    ]


def scenario_mixed_batches(cfg, services, adapter_path: str) -> dict:
    """The base (the champion) and an adapter (the challenger) in the same engine batches, as an A/B
    rollout serves them: every greedy answer must equal the one it gets alone."""
    from loop.sim.evaluate import engine_answers
    from loop.sim.world import World

    w = cfg.world
    qs = [q for f in World(w.seed, 1, w.num_entities, w.drift_fraction, w.new_per_epoch).facts
          for q in f.train_questions()][:24]
    base_alone = engine_answers([(q, None) for q in qs], 8, 8)
    adapter_alone = engine_answers([(q, adapter_path) for q in qs], 8, 8)
    mixed = engine_answers([(q, a) for q in qs for a in (None, adapter_path)], 8, 16)
    changed = sum(x != y for x, y in zip(base_alone, mixed[0::2])) + sum(
        x != y for x, y in zip(adapter_alone, mixed[1::2]))
    return {"sent": len(mixed), "failed": changed, "status_5xx": 0, "lost": 0, "recover_s": 0.0,
            "base_vs_adapter_differ_alone": sum(x != y for x, y in zip(base_alone, adapter_alone))}


def scenario_bad_input(cfg, services, keys, admin) -> dict:
    import httpx

    root = services.gateway_url[:-3]
    models = {t.id: t.endpoints[0].model_name for t in cfg.tenants}
    cases, results = bad_requests(keys, models), []
    for kind, method, route, body, headers, want in cases:
        if headers == "ADMIN":
            headers = {"Authorization": f"Bearer {admin}", "content-type": "application/json"}
        r = httpx.request(method, root + route, content=body, headers=headers, timeout=60)
        try:
            formatted = _openai_error(r.json())
        except ValueError:
            formatted = False
        results.append({"kind": kind, "status": r.status_code, "expected": want, "openai_format": formatted})
    up = send(services.gateway_url, mixed_plan(keys, cfg, 4, seed=5), 4, 4)
    wrong = [r for r in results if r["status"] != r["expected"] or not r["openai_format"]]
    return {"sent": len(results), "failed": len(wrong), "status_5xx": sum(r["status"] >= 500 for r in results),
            "lost": 0, "recover_s": 0.0, "kinds": len(results), "wrong": wrong,
            "server_up_after": all(o.answered for o in up), "cases": results}


def scenario_isolation(cfg, services, keys, admin) -> dict:
    """Every key against every endpoint and admin route: the matrix must be exactly as expected."""
    import httpx

    root = services.gateway_url[:-3]
    principals = {**{f"tenant:{t}": k for t, k in keys.items()}, "admin": admin, "none": None,
                  "forged": "sk-rel-" + secrets.token_hex(12)}
    owner = {e.model_name: t.id for t in cfg.tenants for e in t.endpoints}
    matrix, wrong = {}, []
    for who, key in principals.items():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        row = {}
        for model, tenant in owner.items():
            r = httpx.post(f"{root}/v1/chat/completions", headers=headers, timeout=120,
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            want = 200 if who == f"tenant:{tenant}" else 404 if who.startswith("tenant:") else 401
            row[f"chat {model}"] = (r.status_code, want)
        # Promoting on the endpoint without a challenger: refused by the admin (409), changes nothing.
        for route, method, admin_ok in (("/admin/status", "GET", 200), ("/admin/promote", "POST", 409)):
            r = httpx.request(method, root + route, headers=headers, timeout=60,
                              json={"model": list(owner)[-1]} if method == "POST" else None)
            # No key: 401. A key that is not the admin's (a tenant's, a forged one): 403.
            row[f"{method} {route}"] = (r.status_code, admin_ok if who == "admin" else 401 if key is None else 403)
        r = httpx.get(f"{root}/v1/models", headers=headers, timeout=60)
        listed = sorted(m["id"] for m in r.json().get("data", [])) if r.status_code == 200 else []
        mine = sorted(m for m, t in owner.items() if who == f"tenant:{t}")
        row["GET /v1/models"] = (listed if who.startswith("tenant:") else r.status_code,
                                 mine if who.startswith("tenant:") else 401)
        matrix[who] = {k: v[0] for k, v in row.items()}
        wrong += [f"{who} {k}: got {v[0]}, expected {v[1]}" for k, v in row.items() if v[0] != v[1]]
    return {"sent": sum(len(r) for r in matrix.values()), "failed": len(wrong), "status_5xx": 0, "lost": 0,
            "recover_s": 0.0, "matrix": matrix, "wrong": wrong}


def scenario_secrets(cfg, services, keys, admin, dashboard: str) -> dict:
    """Plaintext keys anywhere the loop writes (traces, MLflow, config dumps, Ray's logs); what the
    gateway and dashboard listen on; whether the dashboard refuses a caller without the Ray token."""
    import httpx
    import psutil
    import ray

    secrets_ = list(keys.values()) + [admin]
    places = [cfg.storage.path()]
    try:
        places.append(Path(ray._private.worker._global_node.get_session_dir_path()) / "logs")
    except AttributeError:  # no local node (a remote cluster): its logs are not on this disk
        pass
    hits = []
    for place in places:
        for f in place.rglob("*"):
            if f.is_file() and f.stat().st_size < 200 << 20:
                data = f.read_bytes()
                hits += [str(f) for s in secrets_ if s.encode() in data]
    dump = cfg.model_dump_json()
    hits += ["config dump" for s in secrets_ if s in dump]
    listening = {}
    for c in psutil.net_connections("tcp"):
        if c.status == "LISTEN" and c.laddr.port in (cfg.serving.port, int(dashboard.rsplit(":", 1)[1].strip("/"))):
            listening[str(c.laddr.port)] = c.laddr.ip
    try:
        no_token = httpx.get(f"{dashboard}/api/jobs/", timeout=10).status_code
    except httpx.HTTPError as e:
        no_token = f"unreachable: {type(e).__name__}"
    public = {p: ip for p, ip in listening.items() if ip not in ("127.0.0.1", "::1")}
    return {"sent": len(places), "failed": len(hits) + len(public), "status_5xx": 0, "lost": 0, "recover_s": 0.0,
            "plaintext_key_hits": hits, "listening": listening, "public_listeners": public,
            "dashboard_without_token": no_token, "ray_auth_mode": os.environ.get("RAY_AUTH_MODE", "")}


def scenario_fuzz(cfg, services, keys, examples: int) -> dict:
    """Hypothesis-generated request bodies (JSON of any shape, and chat requests with hostile values):
    a fixed budget of examples, every answer below 500 and in OpenAI's format when it is an error."""
    import httpx
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    url = services.gateway_url + "/chat/completions"
    key = next(iter(keys.values()))
    model = cfg.tenants[0].endpoints[0].model_name
    headers = {"Authorization": f"Bearer {key}", "content-type": "application/json"}
    scalars = st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40) | st.floats(allow_nan=False) | st.text(max_size=40)
    anything = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(
        st.text(max_size=12), kids, max_size=4), max_leaves=12)
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "", "x"]) | anything,
                                     "content": st.text(max_size=200) | anything})
    chat = st.fixed_dictionaries({"model": st.just(model) | st.text(max_size=40),
                                  "messages": st.lists(message, max_size=3) | anything},
                                 optional={"max_tokens": st.integers(-5, 10 ** 6) | anything,
                                           "temperature": st.floats() | anything, "top_p": st.floats() | anything,
                                           "stream": st.booleans() | anything, "n": st.integers(-1, 3),
                                           "stream_options": anything, "user": st.text(max_size=300),
                                           "seed": anything})
    seen: list[tuple[int, bool]] = []
    client = httpx.Client(timeout=120)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.one_of(chat, anything))
    def probe(body):
        if isinstance(body, dict) and body.get("stream") is True:
            body = {**body, "max_tokens": 2}
        elif isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
            body = {**body, "max_tokens": 8}
        try:
            data = json.dumps(body, allow_nan=False).encode()
        except ValueError:
            return
        r = client.post(url, content=data, headers=headers)
        ok = r.status_code < 500 and (r.status_code == 200 or _openai_error(_json(r)))
        seen.append((r.status_code, ok))

    probe()
    client.close()
    from collections import Counter

    return {"sent": len(seen), "failed": sum(not ok for _, ok in seen),
            "status_5xx": sum(s >= 500 for s, _ in seen), "lost": 0, "recover_s": 0.0,
            "statuses": dict(Counter(str(s) for s, _ in seen))}


def _json(r):
    try:
        return r.json()
    except ValueError:
        return {}


def _register_challenger(cfg, services) -> dict:
    """A second, randomly initialised adapter for the first endpoint, registered and deployed as the
    challenger at half the users: the load runs over an A/B rollout."""
    from benchmarks.serving import make_adapter
    from loop.models.digest import dir_digest
    from loop.services import admin

    endpoint = cfg.tenants[0].endpoints[0].id
    adapter = make_adapter(cfg.model_path(cfg.student), cfg.storage.path("bench-challenger"),
                           cfg.training.lora_rank, seed=11, std=0.2)  # answers visibly unlike the base's
    lineage = services.lineage
    run = lineage.start_run("reliability-challenger")
    artifact = lineage.log_artifacts(run, str(adapter), "adapter")
    info = lineage.register_version(endpoint, run, "adapter", {
        "adapter_digest": dir_digest(adapter), "checkpoint_digest": dir_digest(adapter), "training_run_id": run,
        "validation_verdict": "pass", "artifact": artifact})
    admin(services, "deploy", endpoint, version=info["number"], role="challenger", weight=0.5, by="bench")
    return lineage.version_info(endpoint, "challenger")


# --- the bench ------------------------------------------------------------------------------------
def run(cfg: LoopConfig, requests: int = 1000, concurrency: int = 32, max_tokens: int = 8,
        fault_requests: int = 300, label_prompts: int = 80, fuzz_examples: int = 300,
        root: Path | None = None, dashboard: str = "http://127.0.0.1:8265") -> dict:
    from loop.services import stop_services

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
        challenger = _register_challenger(cfg, services)
        out["challenger"] = challenger["version"]
        step("load", scenario_load, cfg, services, keys, requests, concurrency, max_tokens)
        step("mixed_batches", scenario_mixed_batches, cfg, services, challenger["adapter_path"])
        step("bad_input", scenario_bad_input, cfg, services, keys, admin_key)
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
        step("secrets_and_binding", scenario_secrets, cfg, services, keys, admin_key, dashboard)
    finally:
        stop_services(cfg)
    out["targets"] = {"load.status_5xx": "== 0", "*.lost": "== 0", "bad_input.kinds": ">= 25",
                      "isolation.failed": "== 0", "fuzz.status_5xx": "== 0",
                      "engine_replica_killed.unclean_failures": "== 0"}
    return out
