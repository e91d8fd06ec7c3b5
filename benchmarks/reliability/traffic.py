"""The bench's own loop state and keys, and its users: requests sent at a concurrency, each outcome
classified (answered, a clean 503 with a retry hint, or a dropped connection), checked against the trace log."""
from __future__ import annotations

import asyncio
import json
import random
import secrets
import statistics
import time

from pathlib import Path

from loop.config import ConfigError, LoopConfig, hash_api_key


QUESTION = "What does the Zentrix router cost?"


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
    """The loop's services for `cfg`, replacing any gateway already on the cluster, and the
    engine and the reference teacher unless they are the ones `cfg` would start (an engine start is
    ~50 s on CPU; the slots are filled before the mixed batches)."""
    from ray import serve

    from loop.cluster import ENGINE_APP, GATEWAY_APP, delete_apps, engine_matches, init_ray, start_services

    init_ray(cfg)
    try:
        running = set(serve.status().applications)
    except Exception:  # noqa: BLE001 - Serve not started on this cluster: nothing to replace
        running = set()
    if ENGINE_APP in running and engine_matches(cfg):
        running.discard(ENGINE_APP)
        print("[bench] the running engine serves this config's student: kept", flush=True)
    # The reference teacher is kept by start_services when it is this config's (same world and epoch).
    delete_apps([app for app in (GATEWAY_APP, ENGINE_APP) if app in running], blocking=True)
    return start_services(cfg, epoch=1)


class Outcome:
    __slots__ = ("status", "request_id", "latency_s", "stream", "clean", "answered", "at")

    def __init__(self, status, request_id, latency_s, stream, clean, answered, at):
        self.status, self.request_id, self.latency_s, self.stream = status, request_id, latency_s, stream
        self.clean, self.answered, self.at = clean, answered, at  # `at`: when the answer came back

    @property
    def started(self) -> float:
        return self.at - self.latency_s


def openai_error(body: dict) -> bool:
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
    return openai_error(body) and (r.status_code != 503 or "retry-after" in r.headers)


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


def variants_seen(cfg, ids: set[str]) -> dict:
    from collections import Counter

    from loop.traces.log import read_traces

    return dict(Counter(f"{r['endpoint']}:{r['variant']}" for r in read_traces(cfg.storage.path("traces"))
                        if r["request_id"] in ids))


def kill_once(at_request: int, kill):
    state = {"at": None}

    async def during(started: int):
        if started == at_request and state["at"] is None:
            state["at"] = time.time()
            await asyncio.get_running_loop().run_in_executor(None, kill)

    return during, state


def first_success_after(url, keys, cfg, since: float, timeout_s: float = 300) -> float | None:
    plan = mixed_plan(keys, cfg, 1, seed=7)
    while time.time() - since < timeout_s:
        if send(url, plan, 1, 4)[0].answered:
            return time.time() - since
        time.sleep(1)
    return None


def register_challenger(cfg, services) -> dict:
    """A second, randomly initialised adapter for the first endpoint, registered and deployed as the
    challenger at half the users: the load runs over an A/B rollout."""
    from benchmarks.serving import make_adapter
    from loop.models.digest import dir_digest
    from loop.cluster import admin

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
