"""The gateway under a real `serve.run` with a fake engine: auth, routing, sticky variants, traces.

The real vLLM path is covered by test_cycle_job; this isolates the gateway's own behaviour.
"""
import json

import openai
import pytest
import ray
from fakes import fake_engine, serve_gateway

from loop.config import hash_api_key
from loop.serving.routing import assign_variant
from loop.serving.rollouts import POLL_S, RolloutStore
from loop.traces.log import TraceLog, read_traces

pytestmark = pytest.mark.cluster


def _version(n, adapter=None):
    return {"version": f"student-e1/{n}", "number": n, "adapter_path": adapter, "adapter_digest": f"d{n}",
            "checkpoint_digest": f"d{n}", "training_run_id": f"run{n}", "deployed_at": "now"}


@pytest.fixture(scope="module")
def fake_gateway(ray_cluster, cycle_job, tmp_path_factory):
    from ray import serve

    from loop.config import load_config

    cfg = load_config(cycle_job["config"])
    ray.init(address=ray_cluster["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    # Replicas cannot import the test modules: ship the fakes by value.
    import fakes

    ray.cloudpickle.register_pickle_by_value(fakes)
    traces = tmp_path_factory.mktemp("fake-traces")
    trace_log = ray.remote(TraceLog).options(num_cpus=0).remote(str(traces))
    store = ray.remote(RolloutStore).options(num_cpus=0).remote()
    tenants = {"t1": {"api_key_hashes": [hash_api_key("sk-t1-secret")], "endpoints": ["e1"]},
               "t2": {"api_key_hashes": [hash_api_key("sk-t2-secret")], "endpoints": ["e2"]}}
    rollouts = {"e1": {"champion": _version(1), "challenger": _version(2, "/adapters/two"),
                       "challenger_weight": 0.5, "rollout_id": "r1"},
                "e2": {"champion": _version(1), "challenger": None, "challenger_weight": 0.0, "rollout_id": "r2"}}
    ray.get(store.set.remote(rollouts))
    teacher = {"base_url": f"http://127.0.0.1:{cfg.serving.port}/teacher/v1", "model": "reference-teacher"}
    serve_gateway("fake-gateway", "/fake", rollouts, fake_engine(), trace_log, tenants,
                  hash_api_key("sk-admin-secret"), {"e2": -1.0}, teacher, store)
    yield {"url": f"http://127.0.0.1:{cfg.serving.port}/fake/v1", "traces": traces, "rollouts": rollouts,
           "store": store, "trace_log": trace_log}
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
    refused = [r for r in read_traces(fake_gateway["traces"]) if r["tenant"] == "t2" and r["status"] == 404]
    assert len(refused) == 1 and "model-e1" in refused[0]["error"], "a refused request is traced too"
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


def test_streaming_chat_is_traced_once_with_the_whole_text(fake_gateway):
    # e1 has no cascade, so tokens stream as the engine makes them; this user is on the champion.
    user = next(u for u in (f"s{i}" for i in range(100)) if assign_variant(fake_gateway["rollouts"]["e1"], u) == "champion")
    c = _client(fake_gateway, "sk-t1-secret")
    stream = c.chat.completions.create(model="model-e1", messages=[{"role": "user", "content": "hi"}], user=user,
                                       max_tokens=5, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert chunks[-1].usage.completion_tokens == 5 and chunks[-1].usage.prompt_tokens == 3
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    rid = chunks[0].id
    rows = [r for r in read_traces(fake_gateway["traces"]) if r["request_id"] == rid]
    assert len(rows) == 1 and rows[0]["completion"] == text and rows[0]["completion_tokens"] == 5
    assert rows[0]["model_version"] == "student-e1/1"


def test_an_answer_the_client_hung_up_on_is_traced_as_undelivered(fake_gateway):
    """A client that gives up (a timeout on a plain request, a closed stream) has a 499 record with the
    reason, never a 200: the record says what the client got."""
    import time

    import httpx

    gone = openai.OpenAI(base_url=fake_gateway["url"], api_key="sk-t1-secret", max_retries=0, timeout=0.5)
    with pytest.raises(openai.APITimeoutError):
        gone.chat.completions.create(model="model-e1", messages=[{"role": "user", "content": "slow"}], user="gave-up")
    with httpx.stream("POST", f"{fake_gateway['url']}/chat/completions", timeout=30,
                      headers={"Authorization": "Bearer sk-t1-secret"},
                      json={"model": "model-e1", "messages": [{"role": "user", "content": "slow"}],
                            "max_tokens": 40, "stream": True, "user": "closed-stream"}) as r:
        first = next(r.iter_lines())
        assert first.startswith("data: ")
    rows = {}
    for _ in range(50):  # the records land once the proxy has cancelled the gateway's call
        rows = {r["user"]: r for r in read_traces(fake_gateway["traces"]) if r["user"] in ("gave-up", "closed-stream")}
        if len(rows) == 2:
            break
        time.sleep(0.2)
    assert rows["gave-up"]["status"] == 499 and "client closed the request" in rows["gave-up"]["error"]
    assert rows["gave-up"]["completion"] == "" and rows["gave-up"]["latency_ms"] < 4000, "the call was cancelled"
    streamed = rows["closed-stream"]
    assert streamed["status"] == 499 and "client closed the stream" in streamed["error"]
    assert 1 <= streamed["completion_tokens"] < 40, "the record holds what was sent before the client left"


def test_async_client_and_text_completions(fake_gateway):
    import asyncio

    async def go():
        c = openai.AsyncOpenAI(base_url=fake_gateway["url"], api_key="sk-t2-secret", max_retries=0)
        outs = await asyncio.gather(*[c.completions.create(model="model-e2", prompt=f"p{i}", max_tokens=4)
                                      for i in range(8)])
        t1 = openai.AsyncOpenAI(base_url=fake_gateway["url"], api_key="sk-t1-secret", max_retries=0)
        streamed = [chunk async for chunk in await t1.completions.create(model="model-e1", prompt="p", max_tokens=3,
                                                                         stream=True)]
        return outs, streamed

    outs, streamed = asyncio.run(go())
    assert all(o.object == "text_completion" and o.choices[0].text == "adapter=None" for o in outs)
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == "tok0 tok1 tok2 "
    ids = {o.id for o in outs}
    assert len(ids) == 8 and ids <= {r["request_id"] for r in read_traces(fake_gateway["traces"])}


def test_host_header_names_the_endpoint(fake_gateway):
    import httpx

    r = httpx.post(fake_gateway["url"] + "/chat/completions", headers={
        "Authorization": "Bearer sk-t2-secret", "Host": "model-e2.loop.example"},
        json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200 and r.headers["x-model-version"] == "student-e1/1"
    r = httpx.post(fake_gateway["url"] + "/chat/completions", headers={
        "Authorization": "Bearer sk-t2-secret", "Host": "model-e1.loop.example"},
        json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


def test_request_ids_are_the_gateways_and_feedback_is_tenant_scoped(fake_gateway):
    import httpx

    from loop.traces.log import new_request_id, read_feedback

    # The client's x-request-id is kept as client_request_id; the trace, the body and the one
    # x-request-id header the client gets all carry the gateway's own id.
    chat, auth = fake_gateway["url"] + "/chat/completions", {"Authorization": "Bearer sk-t2-secret"}
    served = [httpx.post(chat, headers={**auth, "x-request-id": "my-own-id"},
                         json={"model": "model-e2", "messages": [{"role": "user", "content": "hi"}]}) for _ in range(2)]
    ids = [r.headers.get_list("x-request-id") for r in served]
    assert [len(i) for i in ids] == [1, 1] and ids[0] != ids[1], ids
    assert [r.json()["id"] for r in served] == [i[0] for i in ids] and ids[0][0].startswith("req-")
    rows = {r["request_id"]: r for r in read_traces(fake_gateway["traces"])}
    assert [rows[i[0]]["client_request_id"] for i in ids] == ["my-own-id", "my-own-id"]
    refused = httpx.post(chat, headers={"Authorization": "Bearer sk-t1-secret", "x-request-id": "my-own-id"},
                         json={"model": "model-e2", "messages": [{"role": "user", "content": "hi"}]})
    assert refused.status_code == 404 and len(refused.headers.get_list("x-request-id")) == 1
    row = [r for r in read_traces(fake_gateway["traces"]) if r["request_id"] == refused.headers["x-request-id"]]
    assert [(r["status"], r["client_request_id"]) for r in row] == [(404, "my-own-id")], "refusals too"

    url, t1 = fake_gateway["url"] + "/feedback", {"Authorization": "Bearer sk-t1-secret"}
    before = read_feedback(fake_gateway["traces"])
    mine = ids[0][0]
    # Another tenant naming t2's request, an id that never existed, the client's own id: the same 404.
    errors = [httpx.post(url, headers=h, json={"request_id": rid, "score": 1.0})
              for h, rid in ((t1, mine), (t1, "req-never"), (auth, "my-own-id"))]
    assert [r.status_code for r in errors] == [404, 404, 404]
    assert [r.json()["error"]["message"].replace(rid, "ID") for r, rid in zip(errors, (mine, "req-never", "my-own-id"))
            ] == ["request 'ID' does not exist or you do not have access to it"] * 3
    assert read_feedback(fake_gateway["traces"]) == before, "a refused feedback records nothing"
    ok = httpx.post(url, headers=auth, json={"request_id": mine, "score": 0.25, "label": "wrong price"})
    assert ok.status_code == 200 and ok.json()["recorded"] is True
    rows = [r for r in read_feedback(fake_gateway["traces"]) if r["request_id"] == mine]
    assert rows == [dict(rows[0], tenant="t2", score=0.25, label="wrong price")]
    # A request this replica did not trace (another replica's) is found in the trace log's files.
    other = new_request_id()
    ray.get(fake_gateway["trace_log"].append.remote([dict(request_id=other, tenant="t1", endpoint="e1",
                                                          variant="champion", model_version="student-e1/1")]))
    assert httpx.post(url, headers=auth, json={"request_id": other, "score": 1.0}).status_code == 404
    assert httpx.post(url, headers=t1, json={"request_id": other, "score": 1.0}).status_code == 200
    for body, param in [({"score": 1}, "request_id"), ({"request_id": mine}, "score"),
                        ({"request_id": mine, "score": "high"}, "score"), ({"request_id": mine, "score": 5.0}, "score"),
                        ({"request_id": mine, "score": -1}, "score")]:
        r = httpx.post(url, headers=auth, json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, body
    nan = httpx.post(url, headers={**auth, "content-type": "application/json"},
                     content=b'{"request_id": "%s", "score": NaN}' % mine.encode())
    assert nan.status_code == 400 and nan.json()["error"]["param"] == "score"
    assert httpx.post(url, json={"request_id": mine, "score": 1}).status_code == 401
    assert len(read_feedback(fake_gateway["traces"])) == len(before) + 2


def test_bad_requests_are_4xx_in_openai_format(fake_gateway):
    import httpx

    url, auth = fake_gateway["url"] + "/chat/completions", {"Authorization": "Bearer sk-t2-secret"}
    cases = [
        (b"{not json", 400, None),
        (b"[1, 2]", 400, None),
        (json.dumps({"model": "model-e2", "messages": "hi"}).encode(), 400, "messages"),
        (json.dumps({"model": "model-e2", "messages": [{"role": "wizard", "content": "x"}]}).encode(), 400,
         "messages.0.role"),
        (json.dumps({"model": "model-e2", "messages": [{"role": "user", "content": "x"}], "temperature": 9}).encode(),
         400, "temperature"),
        (json.dumps({"model": "model-e2", "messages": [{"role": "user", "content": "x"}], "top_p": 0}).encode(),
         400, "top_p"),
        (json.dumps({"model": "model-e2", "messages": [{"role": "user", "content": "x" * (2 << 20)}]}).encode(),
         413, None),
        (json.dumps({"model": "model-e2", "messages": [{"role": "user", "content": "long"}]}).encode(), 400,
         "messages"),
        (json.dumps({"model": "../../etc/passwd", "messages": [{"role": "user", "content": "x"}]}).encode(), 404,
         "model"),
    ]
    for body, status, param in cases:
        r = httpx.post(url, headers=auth, content=body)
        assert r.status_code == status, (body[:80], r.text)
        err = r.json()["error"]
        assert err["message"] and err["type"] and err["param"] == param, (body[:80], err)
    # The server is still up and answering.
    assert httpx.post(url, headers=auth, json={"model": "model-e2", "messages": [{"role": "user", "content": "x"}]}
                      ).status_code == 200


def test_stream_failures_before_the_first_byte_are_real_http_errors(fake_gateway):
    c = _client(fake_gateway, "sk-t1-secret")
    with pytest.raises(openai.BadRequestError) as e:  # the prompt over the context: the caller's mistake
        c.chat.completions.create(model="model-e1", messages=[{"role": "user", "content": "long"}], stream=True)
    assert e.value.body["param"] == "messages" and e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.InternalServerError) as e:  # the engine's: retry
        c.chat.completions.create(model="model-e1", messages=[{"role": "user", "content": "boom"}], stream=True)
    assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
    rows = [r for r in read_traces(fake_gateway["traces"]) if r["request_id"] == e.value.response.headers["x-request-id"]]
    assert [r["status"] for r in rows] == [503], "traced once, as refused"
    # A failure after the first byte: an error event in OpenAI's shape, then the stream ends cleanly.
    import httpx

    with httpx.stream("POST", fake_gateway["url"] + "/chat/completions", headers={"Authorization": "Bearer sk-t1-secret"},
                      json={"model": "model-e1", "messages": [{"role": "user", "content": "boom-late"}],
                            "stream": True}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert r.status_code == 200 and events[-1] == "[DONE]", events
    error = json.loads(events[-2])["error"]
    assert error["type"] == "server_error" and error["message"] and "param" in error, error
    rows = [x for x in read_traces(fake_gateway["traces"]) if x["request_id"] == r.headers["x-request-id"]]
    assert [x["status"] for x in rows] == [503] and rows[0]["completion"] == "tok0 ", rows


def test_tool_choice_auto_returns_the_calls_the_parser_read_streamed_or_not(fake_gateway):
    """A gateway with a tool-call parser: an auto answer that is a call comes back as `tool_calls` with
    the words beside it as content (`finish_reason: tool_calls`), the same as one stream chunk; it is
    never escalated (the endpoint's cascade would take this unsure answer), and its record keeps the
    model's text and the tools offered."""
    import httpx
    from fakes import fake_engine
    from ray import serve

    tenants = {"t2": {"api_key_hashes": [hash_api_key("sk-t2-secret")], "endpoints": ["e2"]}}
    teacher = {"base_url": "http://127.0.0.1:9/v1", "model": "unreachable"}  # asked, it would fail the record
    serve_gateway("fake-tools-gateway", "/fake-tools", fake_gateway["rollouts"], fake_engine(),
                  fake_gateway["trace_log"], tenants, None, {"e2": -1.0}, teacher, None, None, "hermes")
    try:
        url = fake_gateway["url"].replace("/fake/", "/fake-tools/")
        c = openai.OpenAI(base_url=url, api_key="sk-t2-secret", max_retries=0)
        weather = {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}
        ask = dict(model="model-e2", messages=[{"role": "user", "content": "weather in Oslo?"}], tools=[weather])
        raw = c.chat.completions.with_raw_response.create(**ask)
        choice, rid = raw.parse().choices[0], raw.headers["x-request-id"]
        assert choice.finish_reason == "tool_calls" and choice.message.content == "Checking. "
        (call,) = choice.message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == ("weather", {"city": "Oslo"})
        assert "x-loop-escalated" not in raw.headers
        chunks = [json.loads(line[6:]) for line in httpx.post(
            f"{url}/chat/completions", json={**ask, "stream": True}, headers={"Authorization": "Bearer sk-t2-secret"},
            timeout=30).text.splitlines() if line.startswith("data: {")]
        (only,) = chunks
        delta = only["choices"][0]["delta"]
        assert only["choices"][0]["finish_reason"] == "tool_calls" and delta["content"] == "Checking. "
        assert delta["tool_calls"][0]["index"] == 0 and delta["tool_calls"][0]["function"] == {
            "name": "weather", "arguments": '{"city": "Oslo"}'}
        said = c.chat.completions.create(**{**ask, "messages": [{"role": "user", "content": "hi"}]}).choices[0]
        assert said.finish_reason == "stop" and said.message.tool_calls is None and said.message.content
        # An agent loop as langchain runs it: its tool call, then the tool's result, sent back in one conversation.
        from langchain_core.messages import HumanMessage, ToolMessage
        from langchain_openai import ChatOpenAI

        agent = ChatOpenAI(base_url=url, api_key="sk-t2-secret", model="model-e2", max_retries=0).bind_tools([weather])
        asked = [HumanMessage("weather in Oslo?")]
        called = agent.invoke(asked)
        assert [(c["name"], c["args"]) for c in called.tool_calls] == [("weather", {"city": "Oslo"})]
        answered = agent.invoke([*asked, called, ToolMessage("sunny, 21 C", tool_call_id=called.tool_calls[0]["id"])])
        assert answered.content == "adapter=None" and not answered.tool_calls, "the fake's answer after a tool turn"
        (row,) = [r for r in read_traces(fake_gateway["traces"]) if r["request_id"] == rid]
        assert row["completion"].startswith("Checking. <tool_call>") and not row["escalated"] and not row["error"]
        assert json.loads(row["tools"]) == {"tools": [weather], "tool_choice": "auto", "parallel_tool_calls": None}
    finally:
        serve.delete("fake-tools-gateway")


def test_openai_parameters_are_honoured_or_refused_by_name(fake_gateway):
    import httpx

    c = _client(fake_gateway, "sk-t2-secret")  # e2: champion only (its adapter is None)
    stopped = c.chat.completions.create(model="model-e2", messages=[{"role": "user", "content": "x"}], stop=["="])
    assert stopped.choices[0].message.content == "adapter", "the stop string reached the engine"
    parts = c.chat.completions.create(model="model-e2", messages=[{"role": "user", "content": [
        {"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}])
    assert parts.choices[0].message.content == "adapter=None"
    for extra, param in [({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                          "tool_choice"),  # OpenAI's default, auto: no tool-call parser here
                         ({"store": True}, "store")]:
        with pytest.raises(openai.BadRequestError) as e:
            c.chat.completions.create(model="model-e2", messages=[{"role": "user", "content": "x"}], **extra)
        assert e.value.body["param"] == param and e.value.body["code"] == "unsupported_parameter", e.value.body
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="model-e2", messages=[{"role": "user", "content": "x"}],
                                  extra_body={"top_k": 3})
    assert e.value.body["param"] == "top_k" and e.value.body["code"] == "unknown_parameter"
    # One model by id: the caller's own; another tenant's is missing, as one that does not exist.
    assert c.models.retrieve("model-e2").id == "model-e2"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("model-e1")
    # Routes and methods that do not exist answer in OpenAI's error shape too.
    auth = {"Authorization": "Bearer sk-t2-secret"}
    for method, path, status in [("GET", "/nope", 404), ("GET", "/chat/completions", 405)]:
        r = httpx.request(method, fake_gateway["url"] + path, headers=auth)
        assert r.status_code == status and r.json()["error"]["message"] and r.json()["error"]["type"], r.text


def test_n_choices_each_traced_with_their_logprobs(fake_gateway):
    """n > 1: n choices from the variant that serves the request, each its own trace record (and
    feedback target); log-probabilities in each route's shape; streamed, the choices interleave."""
    c = _client(fake_gateway, "sk-t1-secret")
    raw = c.chat.completions.with_raw_response.create(model="model-e1", messages=[{"role": "user", "content": "hi"}],
                                                      n=3, logprobs=True, top_logprobs=1, user="u1")
    resp, rid = raw.parse(), raw.headers["x-request-id"]
    adapter = resp.choices[0].message.content
    assert [ch.message.content for ch in resp.choices] == [adapter, adapter + " #1", adapter + " #2"]
    assert [ch.index for ch in resp.choices] == [0, 1, 2] and resp.usage.completion_tokens == 2 + 3 + 4
    assert [t.token for t in resp.choices[2].logprobs.content] == (adapter + " #2").split(" ")
    assert [[a.token for a in t.top_logprobs] for t in resp.choices[0].logprobs.content] == [[adapter]]
    rows = {r["request_id"]: r for r in read_traces(fake_gateway["traces"]) if r["request_id"].startswith(rid)}
    assert sorted(rows) == [rid, rid + "-1", rid + "-2"]
    assert [rows[i]["completion"] for i in sorted(rows)] == [ch.message.content for ch in resp.choices]
    assert len({rows[i]["model_version"] for i in rows}) == 1 and rows[rid]["variant"] == raw.headers["x-variant"]
    import httpx

    fb = httpx.post(fake_gateway["url"] + "/feedback", headers={"Authorization": "Bearer sk-t1-secret"},
                    json={"request_id": rid + "-2", "score": 1.0})
    assert fb.status_code == 200, fb.text
    text = c.completions.create(model="model-e1", prompt="hi", n=2, logprobs=1, user="u1")
    assert text.choices[1].logprobs.tokens == text.choices[1].text.split(" ")
    assert text.choices[1].logprobs.top_logprobs[0] == {text.choices[1].logprobs.tokens[0]: -0.5, "x": -1.0}
    assert text.choices[1].logprobs.text_offset[:2] == [0, len(text.choices[1].logprobs.tokens[0])]
    stream = c.chat.completions.with_raw_response.create(
        model="model-e1", messages=[{"role": "user", "content": "hi"}], n=2, max_tokens=3, stream=True,
        logprobs=True, stream_options={"include_usage": True})
    chunks, sid = list(stream.parse()), stream.headers["x-request-id"]
    got = {0: "", 1: ""}
    for ch in chunks[:-1]:
        got[ch.choices[0].index] += ch.choices[0].delta.content
        assert ch.choices[0].logprobs.content[0].token == ch.choices[0].delta.content
    assert got == {0: "tok0 tok1 tok2 ", 1: "tok0 tok1 tok2 "} and chunks[-1].usage.completion_tokens == 6
    rows = [r for r in read_traces(fake_gateway["traces"]) if r["request_id"].startswith(sid)]
    assert sorted((r["request_id"], r["completion"]) for r in rows) == [(sid, got[0]), (sid + "-1", got[1])]


def test_low_confidence_escalates_to_the_teacher(fake_gateway, cycle_job):
    from loop.config import load_config
    from loop.sim.world import World

    w = load_config(cycle_job["config"]).world
    fact = World(w.seed, 1, w.num_entities, w.drift_fraction, w.new_per_epoch).facts[0]
    c = _client(fake_gateway, "sk-t2-secret")
    raw = c.chat.completions.with_raw_response.create(model="model-e2",
                                                      messages=[{"role": "user", "content": fact.question(0)}])
    assert raw.parse().choices[0].message.content == fact.answer(), "the caller gets the teacher's answer"
    assert raw.headers["x-loop-escalated"] == "true"
    row = [r for r in read_traces(fake_gateway["traces"]) if r["request_id"] == raw.headers["x-request-id"]][0]
    assert row["escalated"] and row["completion"] == fact.answer() and row["confidence"] == -5.0
    assert row["student_completion"] == "adapter=None"
    # Streamed, the cascade still applies: the stream carries the teacher's answer, traced once.
    stream = c.chat.completions.with_raw_response.create(
        model="model-e2", messages=[{"role": "user", "content": fact.question(0)}], stream=True)
    assert stream.headers["x-loop-escalated"] == "true"
    assert "".join(ch.choices[0].delta.content or "" for ch in stream.parse()) == fact.answer()
    rows = [r for r in read_traces(fake_gateway["traces"]) if r["request_id"] == stream.headers["x-request-id"]]
    assert len(rows) == 1 and rows[0]["escalated"] and rows[0]["completion"] == fact.answer()
    # n choices: the one the student is unsure of (choice 0) is the teacher's, without log-probabilities
    # (they would not be its); the sure one stays the student's. Each record says only its own.
    two = c.chat.completions.with_raw_response.create(model="model-e2", messages=[{"role": "user", "content":
                                                      fact.question(0)}], n=2, logprobs=True)
    choices = two.parse().choices
    assert [ch.message.content for ch in choices] == [fact.answer(), "adapter=None #1"]
    assert choices[0].logprobs is None and [t.token for t in choices[1].logprobs.content] == ["adapter=None", "#1"]
    rid = two.headers["x-request-id"]
    rows = {r["request_id"]: r for r in read_traces(fake_gateway["traces"]) if r["request_id"].startswith(rid)}
    assert (rows[rid]["escalated"], rows[rid]["student_completion"], rows[rid]["completion"]) == (
        True, "adapter=None", fact.answer())
    assert (rows[rid + "-1"]["escalated"], rows[rid + "-1"]["student_completion"], rows[rid + "-1"]["completion"]) == (
        False, "", "adapter=None #1")
    sure = c.chat.completions.with_raw_response.create(model="model-e2", messages=[{"role": "user", "content": "hi"}])
    assert "x-loop-escalated" not in sure.headers and sure.parse().choices[0].message.content == "adapter=None"
    # e1 has no cascade: its questions are answered by the student, whatever the confidence.
    other = _client(fake_gateway, "sk-t1-secret").chat.completions.create(
        model="model-e1", messages=[{"role": "user", "content": fact.question(0)}], user="u0")
    assert other.choices[0].message.content.startswith("adapter=")


def test_a_new_version_goes_live_in_place_through_the_rollout_store(fake_gateway):
    import time

    store, before = fake_gateway["store"], fake_gateway["rollouts"]
    c = _client(fake_gateway, "sk-t2-secret")
    pid = c.chat.completions.with_raw_response.create(model="model-e2", messages=[{"role": "user", "content": "x"}])
    assert pid.headers["x-model-version"] == "student-e1/1"
    changed = {**before, "e2": {"champion": _version(7, "/adapters/seven"), "challenger": None,
                                "challenger_weight": 0.0, "rollout_id": "r7"}}
    ray.get(store.set.remote(changed))
    time.sleep(2 * POLL_S)
    raw = c.chat.completions.with_raw_response.create(model="model-e2", messages=[{"role": "user", "content": "x"}])
    assert raw.headers["x-model-version"] == "student-e1/7"
    assert raw.parse().choices[0].message.content == "adapter=/adapters/seven"
    # A store that is gone does not take the endpoint down: the last known rollouts keep serving.
    ray.kill(store)
    time.sleep(2 * POLL_S)
    again = c.chat.completions.with_raw_response.create(model="model-e2", messages=[{"role": "user", "content": "x"}])
    assert again.headers["x-model-version"] == "student-e1/7"


def test_an_empty_restarted_store_is_ignored():
    import asyncio

    from loop.serving.gateway import Gateway

    class Handle:  # the store's remote method, as a gateway sees it
        def __init__(self, value):
            self.get = type("M", (), {"remote": staticmethod(lambda since: asyncio.sleep(0, value))})()

    g = Gateway.__new__(Gateway)
    g.rollouts, g._rollout_version, g._checked = {"e": {"champion": 1}}, 3, 0.0
    g.rollout_store = Handle((0, {}))
    assert asyncio.run(g._current_rollouts()) == {"e": {"champion": 1}} and g._rollout_version == 3
    g._checked, g.rollout_store = 0.0, Handle((4, {"e": {"champion": 2}}))
    assert asyncio.run(g._current_rollouts()) == {"e": {"champion": 2}} and g._rollout_version == 4
