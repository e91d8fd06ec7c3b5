"""The API under load and attack: mixed load over an A/B rollout, base and adapter in shared batches,
malformed and hostile requests, the tenant isolation matrix, secrets and binding, fuzzing."""
from __future__ import annotations

import json
import os
import secrets

from pathlib import Path

from benchmarks.reliability.traffic import mixed_plan, openai_error, send, tally, traced, variants_seen


def scenario_load(cfg, services, keys, n, concurrency, max_tokens) -> dict:
    out = send(services.gateway_url, mixed_plan(keys, cfg, n), concurrency, max_tokens)
    ids, dup = traced(cfg)
    result = tally(out, ids)
    variants = variants_seen(cfg, {o.request_id for o in out})
    result.update(duplicated=dup, variants_served=variants)
    return result


def scenario_mixed_batches(cfg, services, adapter_path: str) -> dict:
    """The base (the champion) and an adapter (the challenger) in the same engine batches, as an A/B
    rollout serves them: every greedy answer must equal the one it gets alone. First every LoRA slot
    of the engine gets an adapter (`serving.engine.max_loras` others, one request each), as on an
    engine that has served for a while: on vLLM's CPU ops a base row would otherwise borrow the last
    slot's adapter unnoticed (loop/serving/vllm_lora_rows.py)."""
    from benchmarks.serving import make_adapter
    from loop.sim.evaluate import engine_answers
    from loop.sim.world import World

    w = cfg.world
    qs = [q for f in World(w.seed, 1, w.num_entities, w.drift_fraction, w.new_per_epoch).facts
          for q in f.train_questions()][:24]
    base, slots = cfg.model_path(cfg.student), cfg.serving.engine.max_loras
    fillers = [str(make_adapter(base, cfg.storage.path("mixed-batches", f"slot-{i}"), 8, seed=10 + i, std=0.05))
               for i in range(slots)]
    engine_answers([(qs[0], a) for a in fillers], 2, 1)
    base_alone = engine_answers([(q, None) for q in qs], 8, 8)
    adapter_alone = engine_answers([(q, adapter_path) for q in qs], 8, 8)
    mixed = engine_answers([(q, a) for q in qs for a in (None, adapter_path)], 8, 16)
    changed = sum(x != y for x, y in zip(base_alone, mixed[0::2])) + sum(
        x != y for x, y in zip(adapter_alone, mixed[1::2]))
    return {"sent": len(mixed), "failed": changed, "status_5xx": 0, "lost": 0, "recover_s": 0.0,
            "slots_filled_first": len(fillers),
            "base_vs_adapter_differ_alone": sum(x != y for x, y in zip(base_alone, adapter_alone))}


def _json(r):
    try:
        return r.json()
    except ValueError:
        return {}


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
        ("prompt over the context, streamed", "POST", c,
         chat(stream=True, messages=[{"role": "user", "content": "word " * 3000}]), auth, 400),
        ("a field that is not OpenAI's", "POST", c, chat(top_k=3), auth, 400),
        ("tool_choice required without tools", "POST", c, chat(tool_choice="required"), auth, 400),
        ("a tool message without its tool_call_id", "POST", c,
         chat(messages=[{"role": "user", "content": "x"}, {"role": "tool", "content": "42"}]), auth, 400),
        ("json_schema without its schema", "POST", c, chat(response_format={"type": "json_schema"}), auth, 400),
        ("a schema vLLM cannot compile", "POST", c, chat(response_format={"type": "json_schema", "json_schema": {
            "name": "bad", "schema": {"type": "frob"}}}), auth, 400),
        ("logit_bias on a token outside the vocabulary", "POST", c, chat(logit_bias={str(10 ** 9): 5}), auth, 400),
        ("logit_bias beyond 100", "POST", c, chat(logit_bias={"1": 500}), auth, 400),
        ("top_logprobs without logprobs", "POST", c, chat(top_logprobs=3), auth, 400),
        ("n above 16", "POST", c, chat(n=17), auth, 400),
        ("an image part", "POST", c, chat(messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]), auth, 400),
        ("five stop strings", "POST", c, chat(stop=["a", "b", "c", "d", "e"]), auth, 400),
        ("a route that does not exist", "GET", "/v1/nope", b"", auth, 404),
        ("a method the route does not take", "GET", c, b"", auth, 405),
        ("another tenant's model by id", "GET", f"/v1/models/{theirs}", b"", auth, 404),
        ("completion without prompt", "POST", p, json.dumps({"model": mine}).encode(), auth, 400),
        ("completion with empty prompt", "POST", p, json.dumps({"model": mine, "prompt": ""}).encode(), auth, 400),
        ("missing API key", "POST", c, chat(), {"content-type": "application/json"}, 401),
        ("wrong API key", "POST", c, chat(), {**auth, "Authorization": "Bearer sk-wrong"}, 401),
        ("feedback without request_id", "POST", "/v1/feedback", b'{"score": 1}', auth, 400),
        ("feedback score not a number", "POST", "/v1/feedback", b'{"request_id": "x", "score": "high"}', auth, 400),
        ("feedback score above one", "POST", "/v1/feedback", b'{"request_id": "x", "score": 5.0}', auth, 400),
        ("feedback score negative", "POST", "/v1/feedback", b'{"request_id": "x", "score": -1}', auth, 400),
        ("feedback score NaN", "POST", "/v1/feedback", b'{"request_id": "x", "score": NaN}', auth, 400),
        ("feedback score infinite", "POST", "/v1/feedback", b'{"request_id": "x", "score": Infinity}', auth, 400),
        ("feedback on a request that never existed", "POST", "/v1/feedback",
         b'{"request_id": "req-never-served", "score": 1}', auth, 404),
        ("admin deploy: path traversal as model", "POST", "/admin/deploy",
         json.dumps({"model": "../../etc", "version": 2}).encode(), "ADMIN", 404),
        ("admin deploy: adapter path as version", "POST", "/admin/deploy",
         json.dumps({"model": mine, "version": "../../../tmp/evil-adapter"}).encode(), "ADMIN", 400),
        ("admin deploy: unknown version", "POST", "/admin/deploy",
         json.dumps({"model": mine, "version": 999}).encode(), "ADMIN", 404),
        ("admin: unknown action", "POST", "/admin/format-disk", json.dumps({"model": mine}).encode(), "ADMIN", 400),
        ("admin: body not UTF-8", "POST", "/admin/deploy", b'{"model": "\xff"}', "ADMIN", 400),
        ("admin: oversized body", "POST", "/admin/deploy", b'{"model": "' + b"x" * (2 << 20) + b'"}', "ADMIN", 413),
    ]


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
            formatted = openai_error(r.json())
        except ValueError:
            formatted = False
        results.append({"kind": kind, "status": r.status_code, "expected": want, "openai_format": formatted})
    up = send(services.gateway_url, mixed_plan(keys, cfg, 4, seed=5), 4, 4)
    wrong = [r for r in results if r["status"] != r["expected"] or not r["openai_format"]]
    return {"sent": len(results), "failed": len(wrong), "status_5xx": sum(r["status"] >= 500 for r in results),
            "lost": 0, "recover_s": 0.0, "kinds": len(results), "wrong": wrong,
            "server_up_after": all(o.answered for o in up), "cases": results}


def scenario_isolation(cfg, services, keys, admin) -> dict:
    """Every key against every endpoint, every tenant's requests (feedback naming them) and the admin
    routes: the matrix must be exactly as expected, and refused feedback must record nothing."""
    import httpx

    from loop.traces.log import read_feedback

    root = services.gateway_url[:-3]
    principals = {**{f"tenant:{t}": k for t, k in keys.items()}, "admin": admin, "none": None,
                  "forged": "sk-rel-" + secrets.token_hex(12)}
    owner = {e.model_name: t.id for t in cfg.tenants for e in t.endpoints}
    # One request of each endpoint, by its owner: what feedback below names.
    served = {}
    for model, tenant in owner.items():
        r = httpx.post(f"{root}/v1/chat/completions", headers={"Authorization": f"Bearer {keys[tenant]}"},
                       timeout=120, json={"model": model, "messages": [{"role": "user", "content": "hi"}],
                                          "max_tokens": 2})
        served[model] = r.json()["id"] if r.status_code == 200 else ""
    matrix, wrong = {}, []
    for who, key in principals.items():
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        row = {}
        for model, tenant in owner.items():
            r = httpx.post(f"{root}/v1/chat/completions", headers=headers, timeout=120,
                           json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
            want = 200 if who == f"tenant:{tenant}" else 404 if who.startswith("tenant:") else 401
            row[f"chat {model}"] = (r.status_code, want)
            # A label no rule reads ("probe"): even the owner's accepted feedback steers nothing.
            r = httpx.post(f"{root}/v1/feedback", headers=headers, timeout=60,
                           json={"request_id": served[model], "label": "isolation-probe"})
            row[f"feedback on {model}'s request"] = (r.status_code, want)
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
    recorded = sum(f["request_id"] in served.values() for f in read_feedback(cfg.storage.path("traces")))
    if recorded != len(owner):
        wrong.append(f"feedback rows naming the probed requests: {recorded}, expected {len(owner)} (the owners')")
    return {"sent": sum(len(r) for r in matrix.values()), "failed": len(wrong), "status_5xx": 0, "lost": 0,
            "recover_s": 0.0, "matrix": matrix, "wrong": wrong, "feedback_recorded": recorded}


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
        ok = r.status_code < 500 and (r.status_code == 200 or openai_error(_json(r)))
        seen.append((r.status_code, ok))

    probe()
    client.close()
    from collections import Counter

    return {"sent": len(seen), "failed": sum(not ok for _, ok in seen),
            "status_5xx": sum(s >= 500 for s, _ in seen), "lost": 0, "recover_s": 0.0,
            "statuses": dict(Counter(str(s) for s, _ in seen))}
