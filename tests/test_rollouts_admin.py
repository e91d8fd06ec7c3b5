"""Admin routes and A/B rollouts: a real gateway (fake engine), a real RolloutController actor and a
real MLflow registry. Weights, stickiness, promotion and rollback are checked on 1,000 users, and
every change must show in MLflow's aliases and be served without restarting the replica."""
import asyncio
import time

import httpx
import openai
import pytest
import ray
import yaml
from fakes import fake_engine, serve_gateway

from loop.config import LoopConfig, hash_api_key
from loop.lineage.registry import Lineage, registered_name
from loop.models.digest import dir_digest
from loop.models.fetch import read_manifest
from loop.serving.rollouts import WEIGHT_TAG, RolloutController
from loop.serving.rollouts import RolloutStore
from loop.traces.log import TraceLog, read_traces

pytestmark = pytest.mark.cluster
ADMIN, T1 = "sk-admin-rollouts", "sk-t1-rollouts"


@pytest.fixture(scope="module")
def rollouts(ray_cluster, cycle_job, tmp_path_factory):
    """Endpoints e1 (tenant t1) and e2 (t2), versions 2 and 3 of e1 registered (3 failed the gate)."""
    from ray import serve


    raw = yaml.safe_load(cycle_job["config"].read_text())
    state = tmp_path_factory.mktemp("rollouts")
    raw["storage"]["root"] = str(state)
    raw["tenants"] = [{"id": "t1", "api_key_hashes": [hash_api_key(T1)], "endpoints": [{"id": "e1"}]},
                      {"id": "t2", "api_key_hashes": [hash_api_key("sk-t2-rollouts")], "endpoints": [{"id": "e2"}]}]
    raw["rollout"] = {"challenger_weight": 0.1}
    cfg = LoopConfig.model_validate(raw)
    base = LoopConfig.model_validate(yaml.safe_load(cycle_job["config"].read_text()))
    base_dir = base.model_path(base.student)
    lineage = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts"))
    for e in ("e1", "e2"):
        lineage.ensure_base_version(e, base_dir, read_manifest(base_dir))
    for n, verdict in ((2, "pass"), (3, "fail"), (4, "pass")):  # 4 is damaged on disk after registration
        files = state / f"adapter-{n}"
        files.mkdir()
        (files / "adapter_model.safetensors").write_bytes(bytes(range(256)) * n)
        run = lineage.start_run(f"train-{n}")
        lineage.log_artifacts(run, files, "adapter")
        info = lineage.register_version("e1", run, "adapter", {"adapter_digest": dir_digest(files),
                                                               "training_run_id": run, "validation_verdict": verdict})
    with open(f"{info['adapter_path']}/adapter_model.safetensors", "r+b") as f:
        f.write(b"\xff")

    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    import fakes

    ray.cloudpickle.register_pickle_by_value(fakes)
    store = ray.remote(RolloutStore).options(num_cpus=0).remote()
    controller = ray.remote(RolloutController).options(num_cpus=0).remote(cfg, store)
    first = ray.get(controller.publish.remote())
    traces = state / "traces"
    trace_log = ray.remote(TraceLog).options(num_cpus=0).remote(str(traces))
    tenants = {t.id: {"api_key_hashes": t.api_key_hashes, "endpoints": [e.id for e in t.endpoints]}
               for t in cfg.tenants}
    serve_gateway("rollout-gateway", "/rollouts", first, fake_engine(), trace_log, tenants, hash_api_key(ADMIN),
                  {}, None, store, controller)
    root = f"http://127.0.0.1:{cfg.serving.port}/rollouts"
    yield {"root": root, "url": f"{root}/v1", "lineage": lineage, "traces": traces, "trace_log": trace_log}
    serve.delete("rollout-gateway")


def _admin(r, action, body=None, key=ADMIN, method="POST"):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if method == "GET":
        return httpx.get(f"{r['root']}/admin/{action}", headers=headers, timeout=60)
    return httpx.post(f"{r['root']}/admin/{action}", json=body, headers=headers, timeout=60)


def _aliases(r, endpoint="e1") -> dict:
    return {k: int(v) for k, v in r["lineage"].client.get_registered_model(registered_name(endpoint)).aliases.items()}


async def _ask(r, users) -> dict[str, tuple[str, str, str]]:
    """user -> (x-variant, x-model-version, completion) for one request per user, 32 at a time."""
    client = openai.AsyncOpenAI(base_url=r["url"], api_key=T1, max_retries=0)
    sem = asyncio.Semaphore(32)

    async def one(user):
        async with sem:
            raw = await client.chat.completions.with_raw_response.create(
                model="model-e1", messages=[{"role": "user", "content": "hi"}], user=user, max_tokens=4)
            return user, (raw.headers["x-variant"], raw.headers["x-model-version"],
                          raw.parse().choices[0].message.content)

    try:
        return dict(await asyncio.gather(*(one(u) for u in users)))
    finally:
        await client.close()


def test_admin_routes_need_the_admin_key(rollouts):
    assert _admin(rollouts, "status", key=None, method="GET").status_code == 401
    refused = _admin(rollouts, "deploy", {"model": "model-e1", "version": 2}, key=T1)
    assert refused.status_code == 403 and refused.json()["error"]["type"] == "permission_error"
    assert "challenger" not in _aliases(rollouts), "a refused call changed nothing"
    status = _admin(rollouts, "status", method="GET").json()
    assert status["endpoints"]["e1"]["champion"]["version"] == "student-e1/1"


def test_a_challenger_gets_its_weight_of_1000_sticky_users_and_keeps_them(rollouts):
    before = _admin(rollouts, "status", method="GET").json()["replica"]
    resp = _admin(rollouts, "deploy", {"model": "model-e1", "version": 2, "challenger_weight": 0.3})
    assert resp.status_code == 200, resp.text
    assert resp.json()["challenger"]["version"] == "student-e1/2" and resp.json()["challenger_weight"] == 0.3
    assert _aliases(rollouts) == {"champion": 1, "challenger": 2}

    users = [f"user-{i}" for i in range(1000)]
    first = asyncio.run(_ask(rollouts, users))
    share = sum(v == "challenger" for v, _, _ in first.values()) / len(users)
    assert 0.26 <= share <= 0.34, share
    for variant, version, text in first.values():  # the headers name what really answered
        assert version == ("student-e1/2" if variant == "challenger" else "student-e1/1")
        assert (text != "adapter=None") == (variant == "challenger")
    again = asyncio.run(_ask(rollouts, users[:200]))
    assert all(again[u][0] == first[u][0] for u in users[:200]), "one user, one arm"

    # The weight moves at runtime: same replica, more users on the challenger, nobody moved back.
    assert _admin(rollouts, "weights", {"model": "model-e1", "challenger_weight": 0.6}).status_code == 200
    assert rollouts["lineage"].client.get_registered_model(registered_name("e1")).tags[WEIGHT_TAG] == "0.6"
    moved = asyncio.run(_ask(rollouts, users))
    share = sum(v == "challenger" for v, _, _ in moved.values()) / len(users)
    assert 0.56 <= share <= 0.64, share
    assert all(moved[u][0] == "challenger" for u in users if first[u][0] == "challenger")
    assert _admin(rollouts, "status", method="GET").json()["replica"] == before, "no replica restart"

    # Every answer above is one trace row naming the arm and version that served it.
    rows = [r for r in read_traces(rollouts["traces"]) if r["user"].startswith("user-")]
    assert len(rows) == 2200
    assert {(r["variant"], r["model_version"]) for r in rows} == {("champion", "student-e1/1"),
                                                                  ("challenger", "student-e1/2")}


def test_promote_then_rollback_follow_mlflow(rollouts):
    resp = _admin(rollouts, "promote", {"model": "model-e1"})
    assert resp.status_code == 200, resp.text
    assert _aliases(rollouts) == {"champion": 2, "previous": 1}
    mv = rollouts["lineage"].client.get_model_version(registered_name("e1"), "2")
    assert mv.tags["promoted_at"]
    served = asyncio.run(_ask(rollouts, [f"p-{i}" for i in range(50)]))
    assert {v for v in served.values()} == {("champion", "student-e1/2", served["p-0"][2])}

    assert _admin(rollouts, "rollback", {"model": "model-e1"}).status_code == 200
    assert _aliases(rollouts) == {"champion": 1}
    served = asyncio.run(_ask(rollouts, [f"p-{i}" for i in range(50)]))
    assert {version for _, version, _ in served.values()} == {"student-e1/1"}

    # A canary rolled back is just dropped: the champion stays.
    _admin(rollouts, "deploy", {"model": "model-e1", "version": 2, "challenger_weight": 0.5})
    assert _admin(rollouts, "rollback", {"model": "e1"}).status_code == 200
    assert _aliases(rollouts) == {"champion": 1}


@pytest.mark.parametrize("action, body, status, param", [
    ("deploy", {"model": "model-e1"}, 400, "version"),
    ("deploy", {"model": "model-e1", "version": "two"}, 400, "version"),
    ("deploy", {"model": "model-e1", "version": 99}, 404, "version"),
    ("deploy", {"model": "model-e1", "version": 3}, 409, "version"),  # failed validation
    ("deploy", {"model": "model-nope", "version": 2}, 404, "model"),
    ("deploy", {"model": "model-e1", "version": 2, "challenger_weight": 1.5}, 400, "challenger_weight"),
    ("deploy", {"model": "model-e1", "version": 2, "role": "king"}, 400, "role"),
    ("deploy", {"model": "model-e1", "version": 2, "colour": "red"}, 400, "colour"),
    ("weights", {"model": "model-e2", "challenger_weight": 0.5}, 409, None),
    ("promote", {"model": "model-e2"}, 409, None),
    ("rollback", {"model": "model-e2"}, 409, None),
    ("explode", {"model": "model-e1"}, 400, "action"),
])
def test_bad_admin_requests_are_4xx_and_change_nothing(rollouts, action, body, status, param):
    before = (_aliases(rollouts, "e1"), _aliases(rollouts, "e2"))
    resp = _admin(rollouts, action, body)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["message"] and err["param"] == param
    assert (_aliases(rollouts, "e1"), _aliases(rollouts, "e2")) == before


def test_an_adapter_damaged_since_registration_is_refused_with_the_reason_in_mlflow(rollouts):
    before = _aliases(rollouts)
    resp = _admin(rollouts, "deploy", {"model": "model-e1", "version": 4, "challenger_weight": 0.5})
    assert resp.status_code == 409, resp.text
    err = resp.json()["error"]
    assert err["param"] == "version" and "do not match the digest registered" in err["message"]
    assert _aliases(rollouts) == before, "nothing deployed"
    tags = rollouts["lineage"].client.get_model_version(registered_name("e1"), "4").tags
    assert "damaged or changed on disk" in tags["deploy_refused"] and "deployed_at" not in tags


def test_malformed_admin_body(rollouts):
    resp = httpx.post(f"{rollouts['root']}/admin/deploy", content=b"{not json",
                      headers={"Authorization": f"Bearer {ADMIN}"})
    assert resp.status_code == 400 and "JSON" in resp.json()["error"]["message"]


def test_metrics_per_endpoint_and_variant_reach_prometheus(rollouts):
    """Serve's metrics are exported by the node's metrics agent (what the dashboard's Metrics view reads)."""
    node = next(n for n in ray.nodes() if n["Alive"])
    url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
    wanted = ('ray_loop_requests_total', 'endpoint="e1"', 'variant="challenger"', 'status="200"')

    def served(lines):  # one series per replica; the other gateway tests add a few
        return sum(float(ln.rsplit(" ", 1)[1]) for ln in lines if all(w in ln for w in wanted))

    deadline, lines = time.time() + 60, []
    while time.time() < deadline:
        lines = [ln for ln in httpx.get(url, timeout=10).text.splitlines() if ln.startswith("ray_loop_")]
        if served(lines) >= 500:  # about 960 challenger answers above; exports lag a few seconds
            break
        time.sleep(2)
    assert served(lines) >= 500, lines[:20]
    assert any(ln.startswith("ray_loop_latency_ms_bucket") for ln in lines)
