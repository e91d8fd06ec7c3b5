"""The OpenAI-compatible teacher against a local endpoint that misbehaves on purpose: rate limits,
server errors, timeouts, garbage, no logprobs. The real `openai` client does the talking."""
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loop.config import TeacherConfig
from loop.teacher.client import LabelsFailed, OpenAITeacher, TeacherLabeler, split_labels


class Endpoint:
    """Answers `/v1/chat/completions`; `script` maps a prompt to what happens to it, call by call."""

    def __init__(self):
        self.calls: list[dict] = []
        self.script: dict[str, list] = {}
        endpoint = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["content-length"])))
                endpoint.calls.append(body)
                prompt = body["messages"][-1]["content"]
                steps = endpoint.script.get(prompt, [])
                step = steps.pop(0) if steps else "ok"
                if step == "slow":
                    time.sleep(1.5)
                if isinstance(step, int):
                    return self._send(step, {"error": {"message": f"status {step}", "type": "x"}})
                if step == "no-logprobs" and body.get("logprobs"):
                    return self._send(400, {"error": {"message": "logprobs are not supported", "type": "x"}})
                content = {"empty": "", "garbled": "answer \ufffd\x00 to"}.get(step, f"answer to {prompt}")
                logprobs = None
                if body.get("logprobs"):
                    logprobs = {"content": [{"token": w, "logprob": -0.1, "bytes": None, "top_logprobs": [
                        {"token": w, "logprob": -0.1, "bytes": None},
                        {"token": "x", "logprob": -2.5, "bytes": None}][:body["top_logprobs"]]}
                        for w in content.split()]}
                self._send(200, {"id": "c1", "object": "chat.completion", "created": 0, "model": body["model"],
                                 "choices": [{"index": 0, "finish_reason": "length" if step == "cut" else "stop",
                                              "logprobs": logprobs,
                                              "message": {"role": "assistant", "content": content}}],
                                 "usage": {"prompt_tokens": 10, "completion_tokens": 4, "total_tokens": 14}})

            def _send(self, status, obj):
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                if status == 429:
                    self.send_header("retry-after", "0")
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def endpoint():
    e = Endpoint()
    yield e
    e.server.shutdown()


def _teacher(endpoint, tmp_path, **cfg):
    cfg = TeacherConfig(kind="openai", base_url=endpoint.url, model="frontier", timeout_s=1.0, max_retries=2,
                        usd_per_million_prompt_tokens=3.0, usd_per_million_completion_tokens=15.0, **cfg)
    return OpenAITeacher(cfg, endpoint.url, "sk-test", tmp_path / "cache.sqlite")


def _msg(text):
    return [{"role": "user", "content": text}]


def test_retries_rate_limits_and_server_errors_then_caches(endpoint, tmp_path):
    endpoint.script["q"] = [429, 503]
    teacher = _teacher(endpoint, tmp_path)
    label = teacher.label(_msg("q"))
    assert label.completion == "answer to q" and not label.error and len(endpoint.calls) == 3
    assert label.cost_usd == pytest.approx((10 * 3.0 + 4 * 15.0) / 1e6)
    # A re-run (a new teacher on the same cache) never pays twice.
    again = _teacher(endpoint, tmp_path).label(_msg("q"))
    assert again.cached and again.completion == label.completion and again.cost_usd == 0.0
    assert len(endpoint.calls) == 3
    # Another namespace (the reference teacher's next epoch) or another prompt is asked again.
    other = OpenAITeacher(teacher.cfg, endpoint.url, "sk-test", tmp_path / "cache.sqlite", namespace="epoch-2")
    assert not other.label(_msg("q")).cached and len(endpoint.calls) == 4


def test_failures_are_reported_not_raised_and_never_cached(endpoint, tmp_path):
    endpoint.script.update({"dead": [500, 500, 500], "blank": ["empty"], "slow": ["slow", "slow", "slow"]})
    teacher = _teacher(endpoint, tmp_path)
    assert "InternalServerError" in teacher.label(_msg("dead")).error
    assert teacher.label(_msg("blank")).error == "empty or missing answer"
    assert "Timeout" in teacher.label(_msg("slow")).error
    endpoint.script.update({"long": ["cut"], "junk": ["garbled"]})
    assert teacher.label(_msg("long")).error == "answer cut off at teacher.max_tokens (48); raise it"
    assert teacher.label(_msg("junk")).error == "garbled answer (invalid or control characters)"
    # Nothing bad was cached: the next call goes to the (now healthy) endpoint.
    assert teacher.label(_msg("blank")).completion == "answer to blank"


def test_top_logprobs_when_given_and_a_fallback_when_refused(endpoint, tmp_path):
    label = _teacher(endpoint, tmp_path, top_logprobs=2).label(_msg("a b"))
    assert label.top_logprobs == [[["answer", -0.1], ["x", -2.5]], [["to", -0.1], ["x", -2.5]],
                                  [["a", -0.1], ["x", -2.5]], [["b", -0.1], ["x", -2.5]]]
    assert endpoint.calls[-1]["top_logprobs"] == 2
    endpoint.script["c"] = ["no-logprobs"]
    refused = _teacher(endpoint, tmp_path / "other", top_logprobs=2).label(_msg("c"))
    assert refused.completion == "answer to c" and refused.top_logprobs is None
    assert "logprobs" not in endpoint.calls[-1]


def test_labeler_batches_carry_errors_counts_and_cost(endpoint, tmp_path):
    endpoint.script["bad"] = [500, 500, 500]
    cfg = TeacherConfig(kind="openai", base_url=endpoint.url, model="frontier", max_retries=2, concurrency=4,
                        usd_per_million_completion_tokens=1.0)
    labeler = TeacherLabeler(cfg.model_dump(), endpoint.url, "sk-test", str(tmp_path / "c.sqlite"))
    out = labeler({"messages": [json.dumps(_msg("good")), json.dumps(_msg("bad"))]})
    assert out["completion"] == ["answer to good", ""]
    assert out["label_error"][0] == "" and "InternalServerError" in out["label_error"][1]
    assert out["cost_usd"][0] == pytest.approx(4 / 1e6) and out["cached"] == [False, False]


def test_rate_limit_spaces_requests(endpoint, tmp_path):
    teacher = _teacher(endpoint, tmp_path, max_requests_per_s=20.0, cache=False)
    started = time.perf_counter()
    for i in range(6):
        teacher.label(_msg(f"r{i}"))
    assert time.perf_counter() - started >= 5 / 20.0


def test_a_mostly_failing_teacher_stops_the_cycle_and_names_the_knob():
    rows = [{"messages": "[]", "completion": "ok", "label_error": ""}] * 2 + \
           [{"messages": "[]", "completion": "", "label_error": "InternalServerError: boom"}] * 2
    good, failed = split_labels(rows, 0.5)
    assert len(good) == 2 and len(failed) == 2
    with pytest.raises(LabelsFailed, match=r"failed 2 of 4 labels \(first: InternalServerError: boom\).*"
                                           r"data.max_failed_fraction \(0.25\)") as e:
        split_labels(rows, 0.25)
    assert len(e.value.failed) == 2
