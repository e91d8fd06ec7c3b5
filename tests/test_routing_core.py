"""The gateway's routing core and auth without a cluster: which endpoint, variant and version answer,
what the trace record starts with, what the engine is asked, and who may call (loop/serving/routing.py,
loop/serving/auth.py). The same behaviour under a real `serve.run` is test_gateway_routing.py."""
import json

import pytest

from loop.config import hash_api_key
from loop.serving.auth import require_admin, tenant_of
from loop.serving.errors import BadRequest
from loop.serving.protocol import ChatCompletionRequest, CompletionRequest
from loop.serving.routing import assign_variant, engine_args, route

CHAMPION = {"version": "student-e1/1", "adapter_path": None, "adapter_digest": "d1"}
CHALLENGER = {"version": "student-e1/2", "adapter_path": "/adapters/2", "adapter_digest": "d2",
              "training_run_id": "run2"}
MERGED = {"version": "student-e2/3", "adapter_path": "/adapters/3", "engine_app": "merged-e2-3"}
ROLLOUTS = {"e1": {"champion": CHAMPION, "challenger": CHALLENGER, "challenger_weight": 0.5, "rollout_id": "r1"},
            "e2": {"champion": MERGED, "challenger": None, "challenger_weight": 0.0},
            "e3": {"champion": None}}
MODELS = {"model-e1": "e1", "model-e2": "e2", "model-e3": "e3"}


def _chat(**fields) -> bytes:
    body = {"model": "model-e1", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}
    return json.dumps({**body, **fields}).encode()


def _route(body, headers=None, kind=ChatCompletionRequest, models=MODELS):
    return route(headers or {}, kind, body, request_id="req-1", started=0.0, tenant="acme", models=models,
                 rollouts=ROLLOUTS, client_request_id="client-9")


def test_a_user_keeps_one_arm_and_the_arms_split_near_the_weight():
    users = [f"u{i}" for i in range(2000)]
    arms = [assign_variant(ROLLOUTS["e1"], u) for u in users]
    assert abs(arms.count("challenger") / len(users) - 0.5) < 0.05
    assert arms == [assign_variant(ROLLOUTS["e1"], u) for u in users], "sticky"
    assert {assign_variant(ROLLOUTS["e2"], u) for u in users} == {"champion"}, "no challenger: champion only"


def test_the_record_names_the_version_that_answers_and_the_engine_gets_its_adapter():
    user = next(f"u{i}" for i in range(100) if assign_variant(ROLLOUTS["e1"], f"u{i}") == "challenger")
    call, req = _route(_chat(user=user))
    assert (call.endpoint, call.variant, call.model) == ("e1", "challenger", "model-e1")
    r = call.record
    assert (r["request_id"], r["tenant"], r["model_version"], r["adapter_digest"], r["training_run_id"]) == (
        "req-1", "acme", "student-e1/2", "d2", "run2")
    assert r["client_request_id"] == "client-9" and r["user"] == user
    assert json.loads(r["prompt"]) == [{"role": "user", "content": "hi"}]
    assert call.headers == {"x-model-version": "student-e1/2", "x-variant": "challenger"}
    args = engine_args(call, req)
    assert (args["adapter_path"], args["max_tokens"], args["request_id"]) == ("/adapters/2", 7, "req-1")
    assert args["messages"] == [{"role": "user", "content": "hi"}] and "prompt" not in args


def test_the_user_header_overrides_the_body_user():
    by_header = {assign_variant(ROLLOUTS["e1"], "hdr")}
    call, _ = _route(_chat(user="body-user"), headers={"x-loop-user": "hdr"})
    assert call.record["user"] == "hdr" and {call.variant} == by_header


def test_a_merged_version_is_asked_of_its_own_engine_without_an_adapter():
    call, req = _route(_chat(model="model-e2"))
    assert engine_args(call, req)["adapter_path"] is None


def test_a_text_completion_sends_its_prompt():
    call, req = _route(json.dumps({"model": "model-e1", "prompt": "Once", "max_tokens": 3}).encode(),
                       kind=CompletionRequest)
    args = engine_args(call, req)
    assert args["prompt"] == "Once" and "messages" not in args and json.loads(call.record["prompt"]) == "Once"


def test_the_host_header_names_the_endpoint_when_the_body_does_not():
    call, _ = _route(_chat(model=""), headers={"host": "model-e2.example.com:443"})
    assert call.endpoint == "e2"
    with pytest.raises(BadRequest) as e:
        _route(_chat(model=""), headers={"host": "example.com"})
    assert (e.value.status, e.value.param) == (400, "model")


def test_another_tenants_model_is_a_404_like_a_missing_one_and_an_undeployed_one_a_503():
    with pytest.raises(BadRequest) as theirs:
        _route(_chat(), models={"model-e2": "e2"})  # e1 is not this tenant's
    with pytest.raises(BadRequest) as missing:
        _route(_chat(model="model-nope"))
    assert theirs.value.status == missing.value.status == 404
    assert "does not exist or you do not have access" in theirs.value.message
    with pytest.raises(BadRequest) as undeployed:
        _route(_chat(model="model-e3"))
    assert undeployed.value.status == 503 and undeployed.value.code == "not_deployed"


def test_keys_name_their_tenant_and_only_the_admin_key_opens_admin_routes():
    keys = {hash_api_key("sk-acme"): "acme", hash_api_key("sk-globex"): "globex"}
    assert tenant_of({"authorization": "Bearer sk-globex"}, keys) == "globex"
    assert tenant_of({"authorization": "bearer  sk-acme "}, keys) == "acme"
    for headers in ({}, {"authorization": "Bearer "}, {"authorization": "Basic sk-acme"},
                    {"authorization": "Bearer sk-nope"}):
        with pytest.raises(BadRequest) as e:
            tenant_of(headers, keys)
        assert e.value.status == 401, headers
    admin = hash_api_key("sk-admin")
    require_admin({"authorization": "Bearer sk-admin"}, admin)
    with pytest.raises(BadRequest) as e:
        require_admin({"authorization": "Bearer sk-acme"}, admin)
    assert e.value.status == 403
    with pytest.raises(BadRequest) as e:
        require_admin({"authorization": "Bearer sk-admin"}, None)  # a gateway without an admin key
    assert e.value.status == 403
    with pytest.raises(BadRequest) as e:
        require_admin({}, admin)
    assert e.value.status == 401 and "admin key" in e.value.message
