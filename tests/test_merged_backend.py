"""The `merged` backend on the real vLLM engine: the version the cycle job registered, served from its
merged weights with the matched draft for speculative decoding, must answer exactly as the same
version does as a LoRA adapter on the multi-LoRA engine (greedy, fp32), through the real gateway."""
import time

import openai
import pytest
import ray
import yaml
from fakes import serve_gateway

from loop.config import LoopConfig
from loop.cluster import ENGINE_APP, MergedEngines, delete_apps, engine_handle
from loop.serving.rollouts import RolloutController, RolloutStore
from loop.sim.world import World
from loop.traces.log import TraceLog, read_traces

pytestmark = pytest.mark.cluster
ENDPOINT = "tiny-support"


@pytest.fixture(scope="module")
def merged(ray_cluster, cycle_job, tmp_path_factory):
    raw = yaml.safe_load(cycle_job["config"].read_text())
    for tenant in raw["tenants"]:
        for endpoint in tenant["endpoints"]:
            if endpoint["id"] == ENDPOINT:
                endpoint["backend"] = "merged"
    cfg = LoopConfig.model_validate(raw)
    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    store = ray.remote(RolloutStore).options(num_cpus=0).remote()
    controller = ray.remote(RolloutController).options(num_cpus=0).remote(cfg, store, MergedEngines())
    started = time.perf_counter()
    rollouts = ray.get(controller.publish.remote(), timeout=900)  # starts one engine per live version
    start_s = time.perf_counter() - started
    traces = tmp_path_factory.mktemp("merged-traces")
    trace_log = ray.remote(TraceLog).options(num_cpus=0).remote(str(traces))
    tenants = {t.id: {"api_key_hashes": t.api_key_hashes, "endpoints": [e.id for e in t.endpoints]}
               for t in cfg.tenants}
    serve_gateway("merged-gateway", "/merged", rollouts, engine_handle(), trace_log, tenants, None, {}, None, store,
                  controller, None, engine_handle)
    yield {"cfg": cfg, "rollouts": rollouts, "start_s": start_s, "traces": traces,
           "url": f"http://127.0.0.1:{cfg.serving.port}/merged/v1"}
    delete_apps(["merged-gateway"], blocking=True)
    delete_apps(MergedEngines().running(ENDPOINT))


def _questions(cfg, n=4):
    w = cfg.world
    return [f.heldout_question() for f in World(w.seed, 1, w.num_entities, w.drift_fraction, w.new_per_epoch).facts[:n]]


def test_each_live_version_has_its_engine_with_the_draft(merged):
    champion = merged["rollouts"][ENDPOINT]["champion"]
    assert champion["number"] >= 2, "the cycle job registered a new version"
    assert champion["engine_app"] == f"merged-{ENDPOINT}-{champion['number']}"
    # The previous champion keeps its engine too, so a rollback is instant.
    assert set(MergedEngines().running(ENDPOINT)) == {champion["engine_app"], f"merged-{ENDPOINT}-1"}
    info = engine_handle(champion["engine_app"]).info.remote().result()
    assert info["model"] == champion["merged_path"] and info["lora"] is False
    assert info["speculative"]["model"] == champion["draft_path"]
    assert info["speculative"]["num_speculative_tokens"] == merged["cfg"].serving.engine.num_speculative_tokens
    # The other endpoint keeps the multi-LoRA backend: no engine of its own.
    assert "engine_app" not in (merged["rollouts"]["globex-chat"]["champion"] or {})


def test_merged_with_draft_answers_like_the_adapter(merged):
    champion = merged["rollouts"][ENDPOINT]["champion"]
    merged_engine, lora_engine = engine_handle(champion["engine_app"]), engine_handle(ENGINE_APP)
    for i, q in enumerate(_questions(merged["cfg"])):
        msgs = [{"role": "user", "content": q}]
        a = merged_engine.generate.remote(msgs, max_tokens=16, request_id=f"m{i}", confidence=True).result()
        b = lora_engine.generate.remote(msgs, max_tokens=16, adapter_path=champion["adapter_path"],
                                        request_id=f"l{i}", confidence=True).result()
        assert a.text == b.text and a.completion_tokens == b.completion_tokens
        assert abs(a.mean_logprob - b.mean_logprob) < 1e-3


def test_gateway_serves_the_merged_version_and_traces_it(merged):
    champion = merged["rollouts"][ENDPOINT]["champion"]
    client = openai.OpenAI(base_url=merged["url"], api_key="sk-loop-demo-acme", max_retries=0)
    q = _questions(merged["cfg"], 1)[0]
    raw = client.chat.completions.with_raw_response.create(
        model=f"model-{ENDPOINT}", messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0)
    assert raw.headers["x-model-version"] == champion["version"]
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=f"model-{ENDPOINT}", messages=[{"role": "user", "content": q}], max_tokens=16, temperature=0,
        stream=True))
    assert streamed == raw.parse().choices[0].message.content
    row = [r for r in read_traces(merged["traces"]) if r["request_id"] == raw.headers["x-request-id"]]
    assert len(row) == 1 and row[0]["model_version"] == champion["version"]
    assert row[0]["adapter_digest"] == champion["adapter_digest"]
