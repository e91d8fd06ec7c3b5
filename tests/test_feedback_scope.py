"""Feedback is tenant-scoped and request ids are the gateway's own, without a cluster: the feedback
body's rules, the trace-log lookup, the gateway's feedback route on a real TraceLog, and the two
request-id middlewares stacked around Ray Serve's own as its proxy and a replica stack them."""
import asyncio
import json
import math
from types import SimpleNamespace

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from loop.config import hash_api_key
from loop.serving.feedback import RequestOwners, holds_request, parse_feedback
from loop.serving.errors import BadRequest
from loop.serving.protocol import ChatCompletionRequest
from loop.traces.log import TraceLog, new_request_id, read_feedback


def _record(request_id, tenant, **kw):
    return dict(request_id=request_id, tenant=tenant, endpoint="e1", variant="champion",
                model_version="student-e1/1", **kw)


@pytest.mark.parametrize("body", [b'{"request_id": "r", "score": 5.0}', b'{"request_id": "r", "score": NaN}',
                                  b'{"request_id": "r", "score": -1}', b'{"request_id": "r", "score": Infinity}',
                                  b'{"request_id": "r", "score": 1e400}', b'{"request_id": "r", "score": true}',
                                  b'{"request_id": "r", "score": "high"}', b'{"request_id": "r"}'])
def test_a_score_is_a_finite_number_from_0_to_1(body):
    with pytest.raises(BadRequest) as e:
        parse_feedback(body)
    assert (e.value.status, e.value.param) == (400, "score")


def test_a_valid_feedback_body():
    assert parse_feedback(b'{"request_id": "req-1", "score": 1}') == ("req-1", 1.0, None)
    assert parse_feedback(b'{"request_id": "req-1", "score": 0, "label": "wrong"}') == ("req-1", 0.0, "wrong")
    assert parse_feedback(json.dumps({"request_id": "r" * 500, "label": "x" * 256}).encode())[0] == "r" * 128
    for body, param in [(b'{"score": 1}', "request_id"), (b'{"request_id": "", "score": 1}', "request_id"),
                        (b"[1]", None), (json.dumps({"request_id": "r", "label": "x" * 257}).encode(), "label"),
                        (b'{"request_id": "r", "label": 3}', "label"), (b"{nope", None)]:
        with pytest.raises(BadRequest) as e:
            parse_feedback(body)
        assert (e.value.status, e.value.param) == (400, param), body


def test_request_owners_are_bounded_and_keyed_by_tenant():
    owners = RequestOwners(capacity=3)
    for i in range(4):
        owners.add("acme", f"req-{i}")
    assert len(owners) == 3 and ("acme", "req-0") not in owners and ("acme", "req-3") in owners
    assert ("globex", "req-3") not in owners
    owners.add("acme", "req-1")  # seen again: the most recent now, so req-2 is the next to go
    owners.add("acme", "req-4")
    assert ("acme", "req-1") in owners and ("acme", "req-2") not in owners


def test_the_trace_log_holds_a_request_for_its_own_tenant_only(tmp_path):
    log = TraceLog(tmp_path)
    log.append([_record("req-old", "acme"), _record("req-shared", "acme")])
    log.compact()  # these two are in a Parquet part now
    log.append([_record("req-new", "globex"), _record("req-shared", "globex")])  # these in the write-ahead log
    (tmp_path / "wal.jsonl").open("a").write('{"request_id": "req-torn", "tena')
    assert holds_request(tmp_path, "acme", "req-old") and holds_request(tmp_path, "globex", "req-new")
    assert not holds_request(tmp_path, "globex", "req-old") and not holds_request(tmp_path, "acme", "req-new")
    assert holds_request(tmp_path, "acme", "req-shared") and holds_request(tmp_path, "globex", "req-shared")
    assert not holds_request(tmp_path, "acme", "req-never") and not holds_request(tmp_path, "acme", "req-torn")
    assert not holds_request(tmp_path / "empty", "acme", "req-old")


class _Handle:
    """A Ray actor handle over a plain object, as the gateway calls it (`.remote` awaited)."""

    def __init__(self, obj):
        self.obj, self.calls = obj, []

    def __getattr__(self, name):
        def call(*args):
            self.calls.append(name)
            return args[0](self.obj, *args[1:]) if name == "__ray_call__" else getattr(self.obj, name)(*args)

        async def remote(*args):
            return call(*args)

        return SimpleNamespace(remote=remote)


def _gateway(tmp_path):
    from loop.serving.gateway import Gateway

    g = Gateway.__new__(Gateway)
    g.trace_log = _Handle(TraceLog(tmp_path))
    g.key_to_tenant = {hash_api_key("sk-acme"): "acme", hash_api_key("sk-globex"): "globex"}
    g.tenant_models = {"acme": {"model-e1": "e1"}, "globex": {"model-e2": "e2"}}
    g.rollouts = {"e1": {"champion": {"version": "student-e1/1"}}}
    g.rollout_store, g.owners = None, RequestOwners()
    return g


def _request(key, body=b"", headers=(), request_id=""):
    scope = {"type": "http", "method": "POST", "path": "/", "query_string": b"", "state": {"request_id": request_id},
             "headers": [(b"authorization", f"Bearer {key}".encode())] + [(k.encode(), v.encode()) for k, v in headers]}

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    return Request(scope, receive)


def _post(g, key, body: dict):
    r = asyncio.run(g.feedback(_request(key, json.dumps(body).encode())))
    return r.status_code, json.loads(r.body)


def test_feedback_names_a_request_of_the_callers_tenant_or_is_a_404(tmp_path):
    g = _gateway(tmp_path)
    log = g.trace_log.obj
    served = new_request_id()
    log.append([_record(served, "acme")])  # served by another replica: this one does not know it
    status, theirs = _post(g, "sk-globex", {"request_id": served, "score": 0.0})
    never, missing = _post(g, "sk-globex", {"request_id": "req-never", "score": 0.0})
    assert (status, never) == (404, 404)
    # The same answer as for an id that never existed, but the id: no existence leak.
    assert theirs["error"] == {**missing["error"], "message": missing["error"]["message"].replace("req-never", served)}
    assert theirs["error"]["param"] == "request_id" and theirs["error"]["code"] == "request_not_found"
    assert read_feedback(tmp_path) == [], "nothing recorded"
    assert _post(g, "sk-acme", {"request_id": served, "score": 0.75})[0] == 200
    assert [(f["tenant"], f["request_id"], f["score"]) for f in read_feedback(tmp_path)] == [("acme", served, 0.75)]
    # Found once in the log, it is known: the next feedback on it reads no file.
    lookups = g.trace_log.calls.count("__ray_call__")
    assert _post(g, "sk-acme", {"request_id": served, "label": "great"})[0] == 200
    assert g.trace_log.calls.count("__ray_call__") == lookups and len(read_feedback(tmp_path)) == 2
    # Bad scores are refused before any lookup; a bad key before anything.
    for score in (5.0, -1, math.nan):
        status, err = _post(g, "sk-acme", {"request_id": served, "score": score})
        assert (status, err["error"]["param"]) == (400, "score")
    assert _post(g, "sk-nope", {"request_id": served, "score": 1.0})[0] == 401
    assert len(read_feedback(tmp_path)) == 2


def test_a_traced_request_is_known_at_once_under_the_gateways_own_id(tmp_path):
    g = _gateway(tmp_path)
    g.metrics = SimpleNamespace(observe=lambda *a, **k: None)
    mine = new_request_id()
    body = json.dumps({"model": "model-e1", "messages": [{"role": "user", "content": "hi"}]}).encode()
    call, _ = asyncio.run(g._prepare(_request("sk-acme", body, [("x-request-id", "globex-req-7")], mine),
                                     ChatCompletionRequest))
    assert (call.request_id, call.record["client_request_id"]) == (mine, "globex-req-7")
    asyncio.run(g._trace(call))
    assert ("acme", mine) in g.owners
    # Right after the answer, on this replica: no lookup; the client's own id names nothing.
    g.trace_log.calls.clear()
    assert _post(g, "sk-acme", {"request_id": mine, "score": 1.0})[0] == 200 and "__ray_call__" not in g.trace_log.calls
    assert _post(g, "sk-acme", {"request_id": "globex-req-7", "score": 1.0})[0] == 404
    assert _post(g, "sk-globex", {"request_id": mine, "score": 0.0})[0] == 404
    assert [(f["tenant"], f["request_id"]) for f in read_feedback(tmp_path)] == [("acme", mine)]


def test_the_client_gets_one_x_request_id_the_gateways_own():
    """Proxy (ours outside Serve's RequestIdMiddleware) around a replica app behind ServerRequestId:
    every response, refusals included, names the gateway's id once; the client's id reaches the app."""
    from ray.serve._private.http_util import RequestIdMiddleware

    from loop.serving.request_id import ServerRequestId
    from loop.serving.request_id import GatewayRequestId

    async def route(request):
        status = 200 if request.headers.get("authorization") else 401
        return JSONResponse({"id": request.state.request_id, "arrived_with": request.headers.get("x-request-id")},
                            status_code=status)

    app = ServerRequestId(Starlette(routes=[Route("/", route, methods=["POST"])]))

    async def send(stack, headers):
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=stack), base_url="http://t") as c:
            return await c.post("/", headers=headers)

    async def go():
        out = []
        for headers in ({"authorization": "k"}, {"authorization": "k", "x-request-id": "client-1"},
                        {"x-request-id": "client-2"}):
            out.append((await send(GatewayRequestId(RequestIdMiddleware(app)), headers),
                        await send(RequestIdMiddleware(app), headers)))
        return out

    ids = set()
    for (r, stock), sent in zip(asyncio.run(go()), (None, "client-1", "client-2")):
        body = r.json()
        ids.add(body["id"])
        assert r.headers.get_list("x-request-id") == [body["id"]] and body["id"].startswith("req-")
        assert body["arrived_with"] == (sent or body["arrived_with"]) and body["arrived_with"] != body["id"]
        # Serve's proxy alone appends the id the request arrived with: two values, ours first.
        assert stock.headers.get_list("x-request-id") == [stock.json()["id"], stock.json()["arrived_with"]]
    assert len(ids) == 3, "a fresh id per request"
