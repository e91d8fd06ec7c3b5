"""Faults during load: an engine replica or the trace writer killed, a teacher failing 30 % of calls,
MLflow unreachable, the disk full while a checkpoint is written."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
import time

from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from benchmarks.reliability.traffic import first_success_after, kill_once, mixed_plan, send, tally, traced


def _engine_replica():
    import ray

    from loop.cluster import ENGINE_APP

    names = ray.util.list_named_actors(all_namespaces=True)
    for a in names:
        if "REPLICA" in a["name"] and f"{ENGINE_APP}#" in a["name"]:
            return ray.get_actor(a["name"], namespace=a["namespace"])
    raise RuntimeError(f"no replica of {ENGINE_APP} among the named actors: {[a['name'] for a in names]}")


def scenario_engine_killed(cfg, services, keys, n, concurrency, max_tokens) -> dict:
    """The engine replica dies a third of the way in; Serve starts a new one."""
    import ray

    during, state = kill_once(n // 3, lambda: ray.kill(_engine_replica(), no_restart=True))
    out = send(services.gateway_url, mixed_plan(keys, cfg, n, seed=1), concurrency, max_tokens, during)
    ids, dup = traced(cfg)
    result = tally(out, ids, state["at"])
    result["duplicated"] = dup
    if result["recover_s"] is None:  # nothing answered after the kill within the load: wait for it
        result["recover_s"] = first_success_after(services.gateway_url, keys, cfg, state["at"])
    from loop.serving.engine import kill_orphaned_engines

    result["orphaned_engine_processes_ended"] = kill_orphaned_engines()
    return result


def scenario_trace_writer_killed(cfg, services, keys, n, concurrency, max_tokens) -> dict:
    """The trace writer actor dies mid-load; Ray restarts it, it replays its write-ahead log, and the
    gateway's appends are retried (read back once: a retried append is the same record)."""
    import ray

    during, state = kill_once(n // 3, lambda: ray.kill(services.trace_log, no_restart=False))
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
    from loop.cycle import Cycle, CycleFailed, learn
    from loop.cycle.results import LabelResult, TrainResult
    from loop.sim.world import World, training_rows

    endpoint = cfg.tenants[0].endpoints[0]
    tcfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"max_steps": 3})})
    cycle = Cycle(tcfg, services, endpoint, 90, keys[cfg.tenants[0].id], progress=lambda m: None)
    cycle.report.run_id = services.lineage.start_run("disk-full")
    sdir = cycle.ctx.dir / "train"
    sdir.mkdir(parents=True, exist_ok=True)
    w = cfg.world
    dataset = cycle.ctx.dir / "train.jsonl"
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
            data = LabelResult(dataset=str(dataset), dataset_digest="", selected=0, labelled=0, cutoff=0.0, replay="")
            cycle.stage("train", TrainResult, lambda c, d, r: learn.train(c, d, r, data))
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


def _fill(path: Path, keep_bytes: int) -> None:
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    with open(path / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - keep_bytes))
