"""One full cycle on tiny models, submitted with `ray job submit` to a `ray start` cluster:
Ray Serve + vLLM AsyncLLM + Ray Train + MLflow, then checked from the outside."""
import json

import openai
import pytest
from mlflow import MlflowClient

from loop.config import load_config
from loop.traces.log import read_traces

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def job(cycle_job):
    proc = cycle_job["proc"]
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    return cycle_job


def test_job_succeeded_and_printed_the_cycle(job):
    out = job["proc"].stdout
    assert "succeeded" in out.lower(), out[-3000:]
    for stage in ("traffic", "label", "train", "merge", "validate", "register", "deploy", "canary", "evaluate"):
        assert f"[{stage}]" in out
    assert "student accuracy" in out and "stage times" in out


def test_cycle_reports_have_numbers(job):
    reports = json.loads(job["report"].read_text())
    assert {r["endpoint"] for r in reports} == {"tiny-support", "globex-chat"}
    for r in reports:
        assert r["teacher_acc"] == 1.0, ("the reference teacher knows the current world", r)
        assert r["student_acc_before"] == 0.0, ("the base student knows none of the invented facts", r)
        assert r["student_acc_after"] >= r["student_acc_before"], r
        assert r["validation_passed"] and r["new_version"] == f"student-{r['endpoint']}/2", r
        assert r["served_before"] == f"student-{r['endpoint']}/1", r
        assert r["served_after"] == f"student-{r['endpoint']}/2", ("evaluation traffic reached the new version", r)
        assert set(r["stage_seconds"]) >= {"traffic", "label", "train", "merge", "validate", "deploy", "canary"}
        # Went live as challenger; the promotion controller promoted it on the canary's graded traffic.
        assert r["promotion"] == "promote", r
        clock = r["stage_clock"]
        assert clock["checkpoint_to_canary_s"] > sum(r["stage_seconds"][s] for s in ("merge", "validate", "deploy"))
        assert 0 < clock["validate_share"] < 1 and abs(sum(v for k, v in clock.items() if k.endswith("_share")) - 1) < 1e-9


def test_promotion_decided_on_live_evidence_and_recorded_it(job):
    cfg = load_config(job["config"])
    client = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri)
    for endpoint in ("tiny-support", "globex-chat"):
        canary = json.loads(cfg.storage.path("cycles", endpoint, "cycle-0001", "canary", "result.json").read_text())
        ch, champ = canary["challenger"], canary["champion"]
        assert ch["version"] == f"student-{endpoint}/2" and champ["version"] == f"student-{endpoint}/1"
        n = cfg.promotion.min_samples
        assert ch["outcomes"] >= n and champ["outcomes"] >= n and ch["feedback"] == ch["outcomes"], canary
        assert ch["success_rate"] > champ["success_rate"] and canary["p_better"] >= cfg.promotion.promote_confidence
        mv = client.get_model_version(f"student-{endpoint}", "2")
        assert mv.tags["promotion_decision"] == "promote" and mv.tags["promoted_by"] == "controller"
        run = client.get_run(mv.tags["promotion_run_id"])
        assert run.data.tags["decision"] == "promote" and run.data.metrics["p_better"] >= 0.95
        assert run.data.tags["mlflow.parentRunId"] == mv.tags["cycle_run_id"]
        assert str(client.get_model_version_by_alias(f"student-{endpoint}", "previous").version) == "1"


def test_the_gate_checked_regression_teacher_agreement_and_the_draft(job):
    cfg = load_config(job["config"])
    for endpoint in ("tiny-support", "globex-chat"):
        val = json.loads(cfg.storage.path("cycles", endpoint, "cycle-0001", "validate", "result.json").read_text())
        assert val["passed"] and not val["reasons"], val
        # Every suite scored for both; the world's facts came as suite files, forgetting against the base.
        suites = val["suites"]
        assert set(suites) == {"world-current", "world-earlier", "heldout-teacher", "base-regression"}, suites
        assert all(s["passed"] for s in suites.values()), suites
        assert suites["world-current"]["candidate"] > suites["world-current"]["champion"], suites
        assert suites["base-regression"]["num_items"] == 121 and suites["base-regression"]["base"] == 1.0
        assert suites["world-earlier"]["champion"] - suites["world-earlier"]["candidate"] <= 0.25, suites
        assert val["num_regression"] == suites["world-earlier"]["num_items"] > 0, val
        assert val["num_agreement"] > 0 and val["teacher_agreement"] >= cfg.validation.min_teacher_agreement, val
        assert val["draft_acceptance"] >= cfg.validation.min_draft_acceptance, val
        n = cfg.validation.spec_check_questions
        assert val["spec_identical"] == f"{n}/{n}", "speculative decoding kept the greedy output"
        # Serving parity on the multi-LoRA engine; on the merged weights too in test_resume's cycle
        # (conftest sets validation.merged_parity auto here: both endpoints serve adapters).
        n = cfg.validation.parity_questions
        assert val["parity"] == {"questions": n, "multi_lora_identical": f"{n}/{n}"}, val["parity"]
        merge = json.loads(cfg.storage.path("cycles", endpoint, "cycle-0001", "merge", "merge_report.json").read_text())
        assert merge["passed"] and not merge["engine_identical"] and "validate stage's serving parity" in merge["engine_note"], merge


def test_training_learned(job):
    cfg = load_config(job["config"])
    result = json.loads(cfg.storage.path("cycles", "tiny-support", "cycle-0001", "train", "result.json").read_text())
    assert result["metrics"]["steps"] == cfg.training.max_steps
    assert result["metrics"]["loss_last"] < 0.5 * result["metrics"]["loss_first"]


def test_mlflow_lineage(job):
    cfg = load_config(job["config"])
    client = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri)
    mv = client.get_model_version_by_alias("student-tiny-support", "champion")
    assert str(mv.version) == "2"
    tags = mv.tags
    assert tags["parent_version"] == "student-tiny-support/1"
    for key in ("training_run_id", "dataset_digest", "base_digest", "adapter_digest", "merged_digest",
                "draft_digest", "deployed_at"):
        assert tags.get(key), key
    assert tags["validation_verdict"] == "pass"
    assert tags["adapter_digest"] != tags["merged_digest"] != tags["base_digest"]
    base = client.get_model_version("student-tiny-support", "1")
    assert base.tags["loop.kind"] == "base" and base.tags["base_digest"] == tags["base_digest"]
    run = client.get_run(tags["training_run_id"])
    assert run.info.status == "FINISHED" and float(run.data.metrics["loss_last"]) > 0
    cycle = client.get_run(run.data.tags["mlflow.parentRunId"])
    assert cycle.data.tags["loop.cycle"] == "1" and "student_acc_after" in cycle.data.metrics


def test_gateway_serves_the_new_version_and_traces_it(job):
    cfg = load_config(job["config"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serving.port}/v1", api_key="sk-loop-demo-acme")
    raw = client.chat.completions.with_raw_response.create(
        model="model-tiny-support", messages=[{"role": "user", "content": "Who owns the Zorvex widget?"}],
        max_tokens=8, temperature=0, user="pytest-user")
    resp = raw.parse()
    assert resp.choices[0].message.content is not None and resp.usage.completion_tokens >= 1
    assert raw.headers["x-model-version"] == "student-tiny-support/2"
    assert raw.headers["x-variant"] == "champion"
    rid = raw.headers["x-request-id"]
    rows = [r for r in read_traces(cfg.storage.path("traces")) if r["request_id"] == rid]
    assert len(rows) == 1, "the acknowledged request is in the trace log exactly once"
    row = rows[0]
    assert row["model_version"] == "student-tiny-support/2" and row["tenant"] == "acme"
    assert row["user"] == "pytest-user" and row["completion"] == resp.choices[0].message.content
    client_mv = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri).get_model_version(
        "student-tiny-support", "2")
    assert row["adapter_digest"] == client_mv.tags["adapter_digest"]
    assert row["training_run_id"] == client_mv.tags["training_run_id"]
    assert row["completion_tokens"] == resp.usage.completion_tokens and row["latency_ms"] > 0


def test_tenants_are_isolated(job):
    cfg = load_config(job["config"])
    base = f"http://127.0.0.1:{cfg.serving.port}/v1"
    globex = openai.OpenAI(base_url=base, api_key="sk-loop-demo-globex", max_retries=0)
    with pytest.raises(openai.NotFoundError) as e:
        globex.chat.completions.create(model="model-tiny-support", messages=[{"role": "user", "content": "hi"}])
    assert e.value.body["code"] == "model_not_found"
    assert [m.id for m in globex.models.list()] == ["model-globex-chat"]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base, api_key="sk-wrong", max_retries=0).models.list()


def test_bad_requests_get_openai_errors(job):
    cfg = load_config(job["config"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serving.port}/v1", api_key="sk-loop-demo-acme",
                           max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="model-tiny-support", messages=[])
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="model-tiny-support", messages=[{"role": "user", "content": "x"}],
                                       max_tokens=-1)
    assert e.value.body["param"] == "max_tokens"
    # Over the real engine's context (256 tokens): a 400 naming the limit, and the engine keeps serving.
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="model-tiny-support",
                                       messages=[{"role": "user", "content": "widget " * 400}])
    assert e.value.body["code"] == "context_length_exceeded" and "256" in e.value.body["message"]
    ok = client.chat.completions.create(model="model-tiny-support", messages=[{"role": "user", "content": "hi"}],
                                        max_tokens=4)
    assert ok.choices[0].finish_reason in ("stop", "length")


def test_real_engine_streams_the_same_greedy_text(job):
    cfg = load_config(job["config"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serving.port}/v1", api_key="sk-loop-demo-acme")
    msgs = [{"role": "user", "content": "What is the price of the Zorvex widget?"}]
    whole = client.chat.completions.create(model="model-tiny-support", messages=msgs, max_tokens=12, temperature=0)
    chunks = list(client.chat.completions.create(model="model-tiny-support", messages=msgs, max_tokens=12,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2, "tokens arrive as they are made"
    text = client.completions.create(model="model-tiny-support", prompt="The Zorvex widget", max_tokens=6,
                                     temperature=0)
    assert text.usage.completion_tokens >= 1 and text.object == "text_completion"


def test_openai_parameters_through_the_real_engine(job):
    """A stop string ends the answer before it (`finish_reason: stop`), streamed or not, chat or text;
    text parts are one message; a stream over the context is a 400 before its first byte."""
    cfg = load_config(job["config"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serving.port}/v1", api_key="sk-loop-demo-acme",
                           max_retries=0)
    ask = dict(model="model-tiny-support", max_tokens=12, temperature=0)
    msgs = [{"role": "user", "content": "What is the price of the Zorvex widget?"}]
    whole = client.chat.completions.create(messages=msgs, **ask).choices[0].message.content
    assert len(whole) >= 6, whole
    stop = whole[len(whole) // 2:len(whole) // 2 + 2]
    cut = whole[:whole.find(stop)]
    stopped = client.chat.completions.create(messages=msgs, stop=[stop, "\u2603"], **ask).choices[0]
    assert (stopped.message.content, stopped.finish_reason) == (cut, "stop"), (whole, stop)
    chunks = [c for c in client.chat.completions.create(messages=msgs, stop=stop, stream=True, **ask) if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == cut
    assert chunks[-1].choices[0].finish_reason == "stop"
    text = client.completions.create(model="model-tiny-support", prompt="The Zorvex widget", max_tokens=8,
                                     temperature=0).choices[0].text
    assert len(text) >= 2, text
    part = client.completions.create(model="model-tiny-support", prompt="The Zorvex widget", max_tokens=8,
                                     temperature=0, stop=text[1:2]).choices[0]
    assert (part.text, part.finish_reason) == (text[:text.find(text[1:2])], "stop")
    # Text parts: the same answer as the joined string (vLLM's join, a newline).
    two = [{"type": "text", "text": "What is the price"}, {"type": "text", "text": "of the Zorvex widget?"}]
    joined = client.chat.completions.create(messages=[{"role": "user", "content": "What is the price\nof the "
                                                       "Zorvex widget?"}], **ask).choices[0].message.content
    assert client.chat.completions.create(messages=[{"role": "user", "content": two}],
                                          **ask).choices[0].message.content == joined
    # Penalties reach vLLM (its range checked there too): the request is served.
    assert client.chat.completions.create(messages=msgs, presence_penalty=1.5, frequency_penalty=1.5,
                                          **ask).choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=[{"role": "user", "content": "widget " * 400}], stream=True, **ask)
    assert e.value.body["code"] == "context_length_exceeded"
    # A second client library, as its users call it: invoke, stream and batch, with the stop string.
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=str(client.base_url), api_key="sk-loop-demo-acme", model="model-tiny-support",
                      max_tokens=12, temperature=0, max_retries=0)
    question = msgs[0]["content"]
    assert chat.invoke(question).content == whole
    assert chat.invoke(question, stop=[stop]).content == cut
    assert "".join(c.content for c in chat.stream(question, stop=[stop])) == cut
    # One at a time: greedy text is the same at batch 1 (vLLM's batches of 2 need not be bit-equal).
    assert [m.content for m in chat.batch([question, question], config={"max_concurrency": 1})] == [whole, whole]


def test_logprobs_n_logit_bias_and_json_through_the_real_engine(job):
    """top_logprobs k: k entries per token whose values are the served version's (the base with its
    adapter, recomputed here with Hugging Face + peft); n: 2 choices; logit_bias moves the answer;
    json_schema: the answer parses and validates; the engine's refusals are 400s naming the field."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loop.lineage.registry import Lineage

    cfg = load_config(job["config"])
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serving.port}/v1", api_key="sk-loop-demo-acme",
                           max_retries=0)
    msgs = [{"role": "user", "content": "Who owns the Zorvex widget?"}]
    ask = dict(model="model-tiny-support", messages=msgs, max_tokens=6, temperature=0)
    resp = client.chat.completions.create(logprobs=True, top_logprobs=3, **ask)
    content = resp.choices[0].logprobs.content  # tokens as vLLM's server names them (a lone byte decodes to "")
    assert len(content) == resp.usage.completion_tokens >= 1 and all(len(t.top_logprobs) == 3 for t in content)
    served = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts")).version_info("tiny-support")
    base_dir = str(cfg.model_path(cfg.student))
    tok = AutoTokenizer.from_pretrained(base_dir)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, torch_dtype=torch.float32),
                                      served["adapter_path"]).eval()
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
    ids = list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "input_ids") else ids)
    first = len(ids)
    for t in content:  # greedy: the sampled token is the likeliest, then its runners-up
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        top = logp.topk(3)
        assert max(abs(a.logprob - v) for a, v in zip(t.top_logprobs, top.values.tolist())) < 1e-3, t
        assert abs(t.logprob - top.values[0].item()) < 1e-3
        ids.append(top.indices[0].item())
    # n: two sampled choices (with a seed, vLLM's own per-choice seeds); each traced under its own id.
    raw = client.chat.completions.with_raw_response.create(**{**ask, "temperature": 1.0}, n=2, seed=7)
    two, rid = raw.parse(), raw.headers["x-request-id"]
    assert [c.index for c in two.choices] == [0, 1]
    rows = {r["request_id"]: r["completion"] for r in read_traces(cfg.storage.path("traces"))
            if r["request_id"] in (rid, rid + "-1")}
    assert rows == {rid: two.choices[0].message.content, rid + "-1": two.choices[1].message.content}
    # logit_bias: a token pushed by +100 is every token of the answer.
    forced = client.chat.completions.create(logit_bias={str(ids[first]): 100}, logprobs=True, **ask).choices[0]
    assert [t.token for t in forced.logprobs.content] == [content[0].token] * 6
    # json_schema, decoded under vLLM's structured outputs (the random student's whitespace biased away).
    schema = {"type": "object", "properties": {"a": {"enum": ["yes", "no"]}}, "required": ["a"],
              "additionalProperties": False}
    blank = {str(i): -100 for i in range(len(tok)) if not tok.decode([i]).strip()}
    answer = client.chat.completions.create(**{**ask, "max_tokens": 40}, logit_bias=blank, response_format={
        "type": "json_schema", "json_schema": {"name": "yes_no", "schema": schema}}).choices[0].message.content
    assert json.loads(answer)["a"] in ("yes", "no"), answer
    # A forced tool call: its arguments decoded under the function's schema, as `tool_calls`, streamed
    # whole in one chunk; langchain's bind_tools gets it as its tool call; `required`: finish_reason
    # tool_calls.
    tool = {"type": "function", "function": {"name": "answer", "parameters": schema}}
    forced = dict(**{**ask, "max_tokens": 40}, logit_bias=blank, tools=[tool],
                  tool_choice={"type": "function", "function": {"name": "answer"}})
    called = client.chat.completions.create(**forced).choices[0]
    assert called.finish_reason == "stop" and called.message.content is None, "a named function: stop, as OpenAI"
    (call,) = called.message.tool_calls
    assert call.function.name == "answer" and json.loads(call.function.arguments)["a"] in ("yes", "no")
    chunks = [c for c in client.chat.completions.create(**forced, stream=True) if c.choices]
    streamed = chunks[0].choices[0].delta.tool_calls[0]
    assert (streamed.function.name, streamed.function.arguments) == ("answer", call.function.arguments)
    assert chunks[-1].choices[0].finish_reason == "stop"
    # (one call only: the random student would fill the array up to max_tokens)
    required = client.chat.completions.create(**{**forced, "tool_choice": "required", "max_tokens": 96},
                                              parallel_tool_calls=False).choices[0]
    assert required.finish_reason == "tool_calls", required
    (only,) = required.message.tool_calls
    assert only.function.name == "answer" and json.loads(only.function.arguments)["a"] in ("yes", "no")
    from langchain_openai import ChatOpenAI

    bound = ChatOpenAI(base_url=str(client.base_url), api_key="sk-loop-demo-acme", model="model-tiny-support",
                       max_tokens=40, temperature=0, max_retries=0, logit_bias=blank).bind_tools(
        [tool], tool_choice="answer")
    assert bound.invoke(msgs[0]["content"]).tool_calls[0]["args"] == json.loads(call.function.arguments)
    for extra, param in [({"logit_bias": {str(10 ** 6): 1}}, "logit_bias"),
                         ({"response_format": {"type": "json_schema", "json_schema": {
                             "name": "bad", "schema": {"type": "frob"}}}}, "response_format")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(**ask, **extra)
        assert e.value.body["param"] == param, e.value.body


def test_tool_choice_auto_and_an_agents_tool_turns_through_the_real_engine(job, tmp_path):
    """A gateway with a tool-call parser (student.tool_call_parser: hermes) on the real multi-LoRA
    engine: tool_choice auto is decoded freely with the tools in the chat template and read by vLLM's
    Hermes parser (the random student calls nothing: its text is the answer, the same streamed); an
    agent's turns (the assistant's tool call, the tool's result) render through the real template;
    each record says what tools were offered. The parser reading calls is test_openai_params'."""
    import ray
    from fakes import serve_gateway
    from ray import serve

    from loop.config import hash_api_key
    from loop.lineage.registry import Lineage
    from loop.traces.log import TraceLog

    cfg = load_config(job["config"])
    ray.init(address=job["env"]["RAY_ADDRESS"], namespace="loop-tests", ignore_reinit_error=True)
    served = Lineage(cfg.storage.tracking_uri, cfg.storage.path("mlartifacts")).version_info("tiny-support")
    trace_log = ray.remote(TraceLog).options(num_cpus=0).remote(str(tmp_path))
    rollouts = {"tiny-support": {"champion": served, "challenger": None, "challenger_weight": 0.0, "rollout_id": "t"}}
    engine = serve.get_deployment_handle("student-engine", app_name="student-engine")
    serve_gateway("tools-gateway", "/tools", rollouts, engine, trace_log,
                  {"acme": {"api_key_hashes": [hash_api_key("sk-tools")], "endpoints": ["tiny-support"]}},
                  None, None, None, None, None, "hermes")
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{cfg.serving.port}/tools/v1", api_key="sk-tools",
                               max_retries=0)
        weather = {"type": "function", "function": {"name": "weather", "parameters": {
            "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
        ask = dict(model="model-tiny-support", max_tokens=8, temperature=0, tools=[weather])
        msgs = [{"role": "user", "content": "Weather in Oslo?"}]
        raw = client.chat.completions.with_raw_response.create(messages=msgs, **ask)
        auto, rid = raw.parse().choices[0], raw.headers["x-request-id"]
        assert auto.finish_reason in ("stop", "length") and auto.message.tool_calls is None and auto.message.content
        chunks = [c for c in client.chat.completions.create(messages=msgs, stream=True, **ask) if c.choices]
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == auto.message.content
        turns = [*msgs, {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                 "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]},
                 {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
        after = client.chat.completions.with_raw_response.create(messages=turns, **ask)
        assert after.parse().choices[0].message.content is not None
        # The template rendered the turns: the prompt is longer than the question alone.
        assert after.parse().usage.prompt_tokens > raw.parse().usage.prompt_tokens
        rows = {r["request_id"]: r for r in read_traces(tmp_path)}
        first, replay = rows[rid], rows[after.headers["x-request-id"]]
        assert first["status"] == 200 and not first["escalated"] and first["completion"] == auto.message.content
        assert json.loads(first["tools"])["tools"] == [weather] and json.loads(first["tools"])["tool_choice"] == "auto"
        assert json.loads(replay["prompt"])[1]["tool_calls"][0]["function"]["arguments"] == '{"city": "Oslo"}'
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(messages=[*msgs, {"role": "tool", "content": "x"}], **ask)
        assert e.value.body["param"] == "messages.1" and "tool_call_id" in e.value.body["message"]
    finally:
        serve.delete("tools-gateway")


def test_real_engine_reports_confidence(job):
    cfg = load_config(job["config"])
    rows = [r for r in read_traces(cfg.storage.path("traces")) if r["endpoint"] == "globex-chat" and r["status"] == 200]
    assert rows and all(r["confidence"] < 0 for r in rows), "mean token log-probability measured by vLLM"
    assert not any(r["escalated"] for r in rows)
    tiny = [r for r in read_traces(cfg.storage.path("traces")) if r["endpoint"] == "tiny-support"]
    assert all(r["confidence"] == 0.0 for r in tiny), "no cascade configured: no log-probs requested"


def test_draft_is_cotrained_with_the_checkpoint(job):
    cfg = load_config(job["config"])
    for endpoint in ("tiny-support", "globex-chat"):
        draft = json.loads(cfg.storage.path("cycles", endpoint, "cycle-0001", "draft", "result.json").read_text())
        k = cfg.draft_training.num_speculative_tokens
        assert 0 <= draft["acceptance_stale"] <= k and 0 <= draft["acceptance_cotrained"] <= k, draft
        assert draft["draft_kl_last"] < draft["draft_kl_first"], draft
        # The version carries the draft its student accepts more of, with that draft's digest.
        mv = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri).get_model_version_by_alias(
            f"student-{endpoint}", "champion")
        assert mv.tags["draft_path"] == draft["draft_path"] and mv.tags["draft_digest"] == draft["draft_digest"]
        assert draft["cotrained"] == (draft["acceptance_cotrained"] >= draft["acceptance_stale"])


def test_two_tenants_have_isolated_lineage(job):
    """Each endpoint's versions come from its own cycle runs and data; its traces name only its versions."""
    cfg = load_config(job["config"])
    client = MlflowClient(cfg.storage.tracking_uri, registry_uri=cfg.storage.tracking_uri)
    cycle_runs = set()
    for endpoint in ("tiny-support", "globex-chat"):
        mv = client.get_model_version(f"student-{endpoint}", "2")
        assert client.get_run(mv.tags["cycle_run_id"]).data.tags["loop.endpoint"] == endpoint
        assert client.get_run(mv.tags["training_run_id"]).data.tags["loop.endpoint"] == endpoint
        label = json.loads(cfg.storage.path("cycles", endpoint, "cycle-0001", "label", "result.json").read_text())
        assert mv.tags["dataset_digest"] == label["dataset_digest"]
        cycle_runs.add(mv.tags["cycle_run_id"])
        rows = [r for r in read_traces(cfg.storage.path("traces")) if r["endpoint"] == endpoint]
        assert rows and all(r["model_version"].startswith(f"student-{endpoint}/") for r in rows)
        assert {r["tenant"] for r in rows} == {"acme" if endpoint == "tiny-support" else "globex"}
    # (Both tenants' simulated users ask the same world, so their datasets may be byte-identical; the
    # runs, versions and traces that record them are each their own.)
    assert len(cycle_runs) == 2
