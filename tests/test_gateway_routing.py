"""The gateway under a real `serve.run` with a fake engine: auth, routing, sticky variants, traces.

The real vLLM path is covered by test_cycle_job; this isolates the gateway's own behaviour.
"""
from dataclasses import dataclass

import openai
import pytest
import ray

from loop.config import hash_api_key
from loop.serving.engine import Generation
from loop.serving.gateway import assign_variant
from loop.traces.log import TraceLog, read_traces

pytestmark = pytest.mark.cluster


@dataclass
class FakeEngine:
    """Echoes which adapter answered, so the test sees routing in the completion text."""

    async def generate(self, messages, *, max_tokens, temperature=0.0, top_p=1.0, seed=None, adapter_path=None,
                       request_id=""):
        if messages[-1]["content"] == "boom":
            raise RuntimeError("engine died")
        return Generation(text=f"adapter={adapter_path}", prompt_tokens=3, completion_tokens=2, ttft_ms=1.0,
                          finish_reason="stop")


def _version(n, adapter=None):
    return {"version": f"student-e1/{n}", "number": n, "adapter_path": adapter, "adapter_digest": f"d{n}",
            "checkpoint_digest": f"d{n}", "training_run_id": f"run{n}", "deployed_at": "now"}


@pytest.fixture(scope="module")
def fake_gateway(ray_cluster, cycle_job, tmp_path_factory):
    from ray import serve

    from loop.config import load_config
    from serve_apps.gateway_app import ingress_gateway

    cfg = load_config(cycle_job["config"])
    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    # Replicas cannot import this test module: ship FakeEngine by value.
    import sys

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    traces = tmp_path_factory.mktemp("fake-traces")
    trace_log = ray.remote(TraceLog).options(num_cpus=0).remote(str(traces))
    tenants = {"t1": {"api_key_hashes": [hash_api_key("sk-t1-secret")], "endpoints": ["e1"]},
               "t2": {"api_key_hashes": [hash_api_key("sk-t2-secret")], "endpoints": ["e2"]}}
    rollouts = {"e1": {"champion": _version(1), "challenger": _version(2, "/adapters/two"),
                       "challenger_weight": 0.5, "rollout_id": "r1"},
                "e2": {"champion": _version(1), "challenger": None, "challenger_weight": 0.0, "rollout_id": "r2"}}
    app = serve.deployment(ingress_gateway(), name="fake-gateway", ray_actor_options={"num_cpus": 0},
                           user_config={"endpoints": rollouts}).bind(
        serve.deployment(FakeEngine, ray_actor_options={"num_cpus": 0}).bind(), trace_log, tenants,
        hash_api_key("sk-admin-secret"))
    serve.run(app, name="fake-gateway", route_prefix="/fake", blocking=False)
    import time

    for _ in range(120):
        if serve.status().applications["fake-gateway"].status == "RUNNING":
            break
        time.sleep(0.5)
    yield {"url": f"http://127.0.0.1:{cfg.serving.port}/fake/v1", "traces": traces, "rollouts": rollouts}
    serve.delete("fake-gateway")


def _client(g, key):
    return openai.OpenAI(base_url=g["url"], api_key=key, max_retries=0)


def test_sticky_split_is_about_the_configured_weight():
    rollout = {"challenger": {"version": "x"}, "challenger_weight": 0.3, "rollout_id": "r"}
    arms = [assign_variant(rollout, f"user-{i}") for i in range(4000)]
    share = arms.count("challenger") / len(arms)
    assert 0.27 < share < 0.33
    assert all(assign_variant(rollout, f"user-{i}") == arms[i] for i in range(200)), "sticky per user"
    assert assign_variant({"challenger": None, "challenger_weight": 0.5}, "u") == "champion"


def test_routes_users_to_arms_and_traces_every_request(fake_gateway):
    c = _client(fake_gateway, "sk-t1-secret")
    seen = {}
    for i in range(24):
        raw = c.chat.completions.with_raw_response.create(
            model="model-e1", messages=[{"role": "user", "content": "hi"}], user=f"u{i % 8}")
        text = raw.parse().choices[0].message.content
        variant, version = raw.headers["x-variant"], raw.headers["x-model-version"]
        assert (variant, version, text) in {("champion", "student-e1/1", "adapter=None"),
                                            ("challenger", "student-e1/2", "adapter=/adapters/two")}
        assert seen.setdefault(f"u{i % 8}", variant) == variant, "a user stays on one arm"
    assert set(seen.values()) == {"champion", "challenger"}
    rows = read_traces(fake_gateway["traces"])
    assert len(rows) == 24 and all(r["status"] == 200 for r in rows)
    assert {r["model_version"] for r in rows if r["variant"] == "challenger"} == {"student-e1/2"}


def test_engine_failure_is_a_clean_503_and_is_traced(fake_gateway):
    with pytest.raises(openai.InternalServerError) as e:
        _client(fake_gateway, "sk-t1-secret").chat.completions.create(model="model-e1",
                                                             messages=[{"role": "user", "content": "boom"}])
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    rid = e.value.response.headers["x-request-id"]
    row = [r for r in read_traces(fake_gateway["traces"]) if r["request_id"] == rid]
    assert len(row) == 1 and row[0]["status"] == 503 and "engine died" in row[0]["error"]


def test_auth_and_tenant_isolation(fake_gateway):
    with pytest.raises(openai.AuthenticationError):
        _client(fake_gateway, "sk-nope").chat.completions.create(model="model-e1", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        _client(fake_gateway, "sk-t2-secret").chat.completions.create(model="model-e1", messages=[{"role": "user", "content": "x"}])
    assert [m.id for m in _client(fake_gateway, "sk-t2-secret").models.list()] == ["model-e2"]
    import urllib.request

    req = urllib.request.Request(fake_gateway["url"].replace("/v1", "/admin/status"),
                                 headers={"Authorization": "Bearer sk-t1-secret"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 403
    req = urllib.request.Request(fake_gateway["url"].replace("/v1", "/admin/status"),
                                 headers={"Authorization": "Bearer sk-admin-secret"})
    import json

    assert json.loads(urllib.request.urlopen(req).read())["endpoints"]["e1"]["challenger_weight"] == 0.5


def test_keys_never_reach_the_trace_log(fake_gateway):
    text = "".join(str(r) for r in read_traces(fake_gateway["traces"]))
    assert "sk-t1-secret" not in text and "sk-t2-secret" not in text
