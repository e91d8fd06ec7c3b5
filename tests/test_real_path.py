"""The real path: a domain the demo world does not have, a teacher that is its own HTTP process,
`traffic.simulate: false`, logs imported and traffic and feedback sent from outside with the
`openai` SDK, the judge giving outcomes where users gave none, and the canary deciding on that
traffic.

One cycle of `globex-chat` on the session's cluster (marked `last`: after the demo report moved it
on, before test_resume, which moves only tiny-support). The domain is the travel-and-expense policy
of benchmarks/domains/expense_policy.json: answers of a sentence carrying two details each.
"""
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
import yaml
from mlflow import MlflowClient

from conftest import ROOT, _free_port
from loop.config import load_config
from loop.traces.log import read_feedback, read_traces

pytestmark = [pytest.mark.cluster, pytest.mark.last]
ENDPOINT, MODEL, KEY = "globex-chat", "model-globex-chat", "sk-loop-demo-globex"
DOMAIN = ROOT / "benchmarks" / "domains" / "expense_policy.json"
TEACHER_KEY = "sk-frontier-test"


@pytest.fixture(scope="module")
def teacher():
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.domains.teacher", "--domain", str(DOMAIN),
                             "--port", str(port)], cwd=ROOT, env={**_env(), "TEACHER_API_KEY": TEACHER_KEY},
                            stdout=subprocess.PIPE, text=True)
    assert "domain teacher on" in proc.stdout.readline()
    yield f"http://127.0.0.1:{port}/v1"
    proc.terminate()
    proc.wait(timeout=10)


def _env():
    import os

    return dict(os.environ)


def _policies():
    return json.loads(DOMAIN.read_text())["policies"]


def _ask(client, question: str, user: str) -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=96, temperature=0, user=user)
    return raw.headers["x-request-id"], raw.parse().choices[0].message.content or ""


@pytest.fixture(scope="module")
def real(cycle_job, teacher, tmp_path_factory):
    assert cycle_job["proc"].returncode == 0
    raw = yaml.safe_load(cycle_job["config"].read_text())
    raw.pop("world", None)  # a demo-only section: refused with simulate false
    raw["traffic"] = {"simulate": False}
    raw["teacher"] = {"kind": "openai", "base_url": teacher, "model": "frontier", "api_key_env": "TEACHER_API_KEY",
                      "max_tokens": 48, "usd_per_million_prompt_tokens": 2.5, "usd_per_million_completion_tokens": 10.0}
    suites = tmp_path_factory.mktemp("suites")
    (suites / "expense-policy.jsonl").write_text((ROOT / "configs" / "suites" / "expense-policy.jsonl").read_text())
    # The team's own suite of what its users ask most (the phrasings they send below), graded by the
    # policy's details as the shipped suite grades its unseen phrasings.
    (suites / "popular.jsonl").write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": q}], "grader": "regex",
                    "reference": "(?s)" + "".join(f"(?=.*{re.escape(d)})" for d in p["details"])}) + "\n"
        for p in _policies() for q in p["questions"][1:3]))
    raw["validation"] = {**raw.get("validation", {}), "parity_questions": 0, "spec_check_questions": 0,
                         "suites": [{"name": "expense-policy", "kind": "skill", "path": str(suites / "expense-policy.jsonl")},
                                    {"name": "popular", "kind": "skill", "min_gain": 0.4,
                                     "path": str(suites / "popular.jsonl")}]}
    raw["draft_training"]["enabled"] = False  # the version keeps its parent's draft (co-training is tested elsewhere)
    # The policies' answers are 40-75 tokens for the tiny tokenizer (trained on the world's text):
    # longer sequences and answers, and the steps for the tiny random student to learn them.
    raw["training"].update(max_seq_len=160, max_steps=400)
    # The warm start is the champion of the demo world's facts, another domain: L2 toward it held the
    # policies back (measured on this cycle's data: trained-phrasing token F1 0.10 with l2 0.01, 0.69
    # without; from a fresh adapter 1.00), so the canary's users saw no right answer from either arm.
    # At learning rate 0.02 (tiny.yaml's 0.01 learned 63 % of the details, 0.02 97 %, offline).
    raw["training"].update(regularizer="none", learning_rate=0.02)
    raw["validation"]["max_new_tokens"] = 80
    # A 2-layer random student does not carry a policy over to a phrasing it never saw (held-out token
    # F1 0.00-0.07, candidate and champion alike): the gate's bar here is the users' own suite
    # (`popular`, min_gain 0.4); held-out agreement is scored and reported, with no floor.
    raw["validation"]["min_teacher_agreement"] = 0.0
    raw["data"] = {**raw.get("data", {}), "heldout_fraction": 0.25,
                   "judge": {"sample_fraction": 1.0, "max_requests": 200}}
    # Latency is per request: the learned answer is a 60-token sentence where the tiny champion stops
    # after a few tokens of noise (measured: p95 2198 ms vs 279 ms), which tiny.yaml's 5x would call a
    # regression. The guardrail stays on, at what a longer right answer costs here.
    raw["promotion"] = {**raw.get("promotion", {}), "mode": "canary", "min_samples": 6, "canary_wait_s": 240,
                        "check_interval_s": 5, "max_latency_p95_ratio": 30.0}
    config = cycle_job["config"].with_name("tiny-real.yaml")
    config.write_text(yaml.safe_dump(raw))
    cfg = load_config(config)
    env = {**cycle_job["env"], "TEACHER_API_KEY": TEACHER_KEY}
    check = subprocess.run([sys.executable, "-m", "loop.cli", "config", "check", str(config)], env=env,
                           capture_output=True, text=True, cwd=ROOT)
    assert check.returncode == 0, check.stdout + check.stderr

    # History from before the loop: the first phrasing of every policy, imported.
    logs = tmp_path_factory.mktemp("logs") / "history.jsonl"
    logs.write_text("".join(json.dumps({"messages": [{"role": "user", "content": p["questions"][0]}],
                                        "response": "Please ask HR.", "user": f"past-{i}"}) + "\n"
                            for i, p in enumerate(_policies())))
    imported = subprocess.run([sys.executable, "-m", "loop.cli", "traces", "import", str(logs), "--config",
                               str(config), "--endpoint", MODEL], env=env, capture_output=True, text=True, cwd=ROOT)
    assert imported.returncode == 0, imported.stdout + imported.stderr

    gateway = f"http://127.0.0.1:{cfg.serving.port}/v1"
    client = openai.OpenAI(base_url=gateway, api_key=KEY, max_retries=0)
    sent = []
    # Live traffic: the second and third phrasings, with a user's feedback on some of the answers.
    for i, p in enumerate(_policies()):
        for q in p["questions"][1:3]:
            rid, _ = _ask(client, q, f"user-{i % 4}")
            sent.append(rid)
    for rid in sent[::4]:
        r = httpx.post(f"{gateway}/feedback", headers={"Authorization": f"Bearer {KEY}"},
                       json={"request_id": rid, "score": 0.0})
        assert r.status_code == 200, r.text

    # During the canary, users keep asking (the popular questions again) and say whether the answer
    # was the policy (a user who knows it when they read it: token F1 with it at least 0.5). They start
    # once the challenger is deployed: asking during training (one request every 0.3 s of up to 96
    # tokens) only shared the two cores with it and gave the canary nothing.
    stop = threading.Event()
    cycles = cfg.storage.path("cycles", ENDPOINT)
    before = set(cycles.glob("cycle-*/deploy/result.json"))

    def users():
        from loop.suites import token_f1

        while not stop.is_set() and not set(cycles.glob("cycle-*/deploy/result.json")) - before:
            time.sleep(0.5)
        n = 0
        while not stop.is_set():
            p = _policies()[n % 12]
            try:
                rid, text = _ask(client, p["questions"][1 + n % 2], f"user-{n % 8}")
                sent.append(rid)
                httpx.post(f"{gateway}/feedback", headers={"Authorization": f"Bearer {KEY}"},
                           json={"request_id": rid, "score": float(token_f1(text, p["answer"]) >= 0.5)})
            except (openai.APIError, httpx.HTTPError):
                pass  # a refusal is traced too; the canary's evidence is the rest
            n += 1
            time.sleep(0.3)

    started = time.time()
    thread = threading.Thread(target=users, daemon=True)
    thread.start()
    try:
        proc = subprocess.run([sys.executable, "jobs/run_loop.py", "--config", str(config), "--cycles", "1",
                               "--endpoint", ENDPOINT], env=env, capture_output=True, text=True, cwd=ROOT, timeout=1200)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    cycle = max(cfg.storage.path("cycles", ENDPOINT).glob("cycle-*"))
    return {"cfg": cfg, "proc": proc, "sent": sent, "report": json.loads((cycle / "report.json").read_text()),
            "cycle": cycle, "seconds": time.time() - started, "import": imported.stdout}


def test_a_new_champion_from_the_canary_on_outside_traffic(real):
    rep, cfg = real["report"], real["cfg"]
    assert rep["new_version"], rep["notes"]
    client = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri)
    champion = client.get_model_version_by_alias(f"student-{ENDPOINT}", "champion")
    assert rep["new_version"] == f"student-{ENDPOINT}/{champion.version}", \
        (champion.version, rep["new_version"], rep["promotion"], real["proc"].stdout[-3000:])
    assert "[canary] deciding on live traffic: up to 240 s" in real["proc"].stdout


def test_the_domain_was_learned_and_every_suite_was_scored(real):
    suites = real["report"]["suites"]
    assert set(suites) >= {"heldout-teacher", "expense-policy", "popular", "base-regression"}, suites
    # What the users ask: every detail of the policy in most answers, where the champion had none.
    popular = suites["popular"]
    assert popular["num_items"] == 24 and popular["candidate"] >= popular["champion"] + 0.4, popular
    # Held-out phrasings are scored on what the data stage kept back; whether that agreement rises is
    # `loopctl bench domain`'s figure on a real student (see min_teacher_agreement in the fixture).
    held = suites["heldout-teacher"]
    assert held["num_items"] >= 6 and held["candidate"] is not None and held["champion"] is not None, held
    base = suites["base-regression"]
    assert base["candidate"] >= base["base"] - real["cfg"].validation.max_regression_drop, base
    # The real path prints its own figures, not the demo's accuracy or targets.
    out = real["proc"].stdout
    assert "student accuracy" not in out and "targets" not in out.lower(), out[-3000:]
    assert re.search(r"heldout-teacher \d\.\d\d -> \d\.\d\d", out), out[-3000:]


def test_every_request_sent_has_its_trace_row_and_the_judge_graded_the_unrated(real):
    traces = real["cfg"].storage.path("traces")
    rows = {r["request_id"]: r for r in read_traces(traces)}
    missing = [rid for rid in real["sent"] if rid not in rows]
    assert not missing, f"{len(missing)} of {len(real['sent'])} requests have no trace row"
    assert all(rows[rid]["tenant"] == "globex" and rows[rid]["model_version"] for rid in real["sent"])
    judged = [f for f in read_feedback(traces) if f.get("source") == "judge"]
    assert judged and {f["tenant"] for f in judged} == {"globex"}
    assert {f["request_id"] for f in judged} <= set(rows)


def test_the_lineage_names_imported_and_live_traces(real):
    from loop.lineage.chain import chain

    cfg = real["cfg"]
    dataset = chain(cfg, ENDPOINT)["dataset"]
    digest = re.search(r"\((sha256:[0-9a-f]+)\)", real["import"]).group(1)
    live, imported = map(int, re.fullmatch(r"live:(\d+) imported:(\d+)", dataset["traces"]).groups())
    assert imported == 12 and live >= 24, dataset
    assert digest in dataset["imported_logs"], (digest, dataset)
    client = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              "metrics.judged > 0", max_results=50)
    assert any(r.data.metrics.get("judge_cost_usd", 0) > 0 for r in runs), "the judge's grades were paid and counted"
