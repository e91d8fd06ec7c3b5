"""The teacher as a judge, against a local OpenAI-compatible endpoint through the real `openai`
client: grades parsed, a reply with no grade scored 0 and counted, calls cached and priced; and the
gate's `judge` grader using it."""
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from loop.config import JudgeConfig, TeacherConfig
from loop.teacher.judge import TeacherJudge, judge_messages, parse_grade
from loop.suites import SuiteItem, grade


@pytest.fixture
def judge_endpoint():
    """Grades 9 when the answer states the reference, 2 when not, and rambles without a number for 'ramble'."""
    calls = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            calls.append(body)
            text = body["messages"][-1]["content"]
            answer = text.split("ASSISTANT ANSWER:\n", 1)[1]
            reference = text.split("REFERENCE:\n", 1)[1].split("\n\n")[0] if "REFERENCE:" in text else ""
            reply = "no idea" if "ramble" in answer else ("9" if reference and reference in answer else "2")
            data = json.dumps({"id": "j", "object": "chat.completion", "created": 0, "model": body["model"],
                               "choices": [{"index": 0, "finish_reason": "stop",
                                            "message": {"role": "assistant", "content": reply}}],
                               "usage": {"prompt_tokens": 50, "completion_tokens": 1, "total_tokens": 51}}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", calls
    server.shutdown()


def _judge(url, tmp_path, **cfg):
    teacher = TeacherConfig(kind="openai", base_url=url, model="frontier", usd_per_million_prompt_tokens=2.0,
                            usd_per_million_completion_tokens=10.0)
    return TeacherJudge(teacher, url, "sk-test", JudgeConfig(**cfg), str(tmp_path / "cache.sqlite"))


def test_grades_are_parsed_cached_and_priced(judge_endpoint, tmp_path):
    url, calls = judge_endpoint
    judge = _judge(url, tmp_path)
    conv = [{"role": "user", "content": "How many days to file an expense claim?"}]
    assert judge.grade(conv, "Within 30 days of the trip.", "30 days") == 0.9
    assert judge.grade(conv, "Whenever you like.", "30 days") == 0.2
    assert judge.grade(conv, "let me ramble", "30 days") == 0.0 and judge.usage.failed == 1
    assert len(calls) == 3 and calls[0]["messages"][0]["role"] == "system" and calls[0]["temperature"] == 0
    assert judge.usage.cost_usd == pytest.approx(3 * (50 * 2.0 + 1 * 10.0) / 1e6)
    again = _judge(url, tmp_path)
    assert again.grade(conv, "Within 30 days of the trip.", "30 days") == 0.9 and len(calls) == 3
    assert again.usage.cached == 1 and again.usage.cost_usd == 0.0


def test_pass_score_and_the_suite_grader(judge_endpoint, tmp_path):
    url, _ = judge_endpoint
    judge = _judge(url, tmp_path, pass_score=0.7)
    item = SuiteItem(({"role": "user", "content": "Claim deadline?"},), "30 days", "judge")
    assert grade(item, "30 days after the trip", judge) == 1.0
    assert grade(item, "no deadline", judge) == 0.0


def test_prompt_and_grade_parsing():
    msgs = judge_messages("RUBRIC", [{"role": "user", "content": "q?"}], "a.", None)
    assert msgs[0] == {"role": "system", "content": "RUBRIC"} and "REFERENCE" not in msgs[1]["content"]
    assert [parse_grade(t) for t in ("8", "Score: 10/10", "7.", "none", "11")] == [8, 10, 7, None, None]
