"""A stand-in frontier endpoint for a domain file: its own OpenAI-compatible HTTP process.

It knows the domain's policies: a question gets the answer of the policy whose phrasings share the
most words with it ("I don't know." when none shares any), and a judge call (the loop's rubric
prompt, `ASSISTANT ANSWER:` in its user turn) gets 10 when the answer carries every detail of the
asked policy, 5 for some, 0 for none. The loop talks to it exactly as to a real frontier endpoint
(`teacher.kind: openai`); a real one replaces it by changing `teacher.base_url`.

    python -m benchmarks.domains.teacher --domain benchmarks/domains/expense_policy.json --port 8100
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

MODEL = "frontier"


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class Domain:
    def __init__(self, path: str | Path):
        self.policies = json.loads(Path(path).read_text())["policies"]

    def policy(self, question: str) -> dict | None:
        asked = _words(question)
        best = max(self.policies, key=lambda p: max(len(asked & _words(q)) for q in p["questions"]))
        return best if max(len(asked & _words(q)) for q in best["questions"]) else None

    def answer(self, question: str) -> str:
        p = self.policy(question)
        return p["answer"] if p else "I don't know."

    def grade(self, question: str, answer: str) -> int:
        p = self.policy(question)
        if p is None:
            return 0
        found = sum(d.lower() in answer.lower() for d in p["details"])
        return 10 if found == len(p["details"]) else 5 if found else 0


def reply(domain: Domain, body: dict) -> str:
    last = next(m["content"] for m in reversed(body["messages"]) if m["role"] == "user")
    if "ASSISTANT ANSWER:\n" in last:  # loop/teacher/judge.py's prompt
        asked = last.split("USER QUESTION (the conversation so far):\n", 1)[-1].split("\n\n", 1)[0]
        answer = last.split("ASSISTANT ANSWER:\n", 1)[1]
        return str(domain.grade(asked, answer))
    return domain.answer(last)


def make_server(domain: Domain, port: int, api_key: str | None) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _send(self, status: int, payload: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if api_key and self.headers.get("authorization", "") != f"Bearer {api_key}":
                self._send(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
                return False
            return True

        def do_GET(self):
            if not self._authorized():
                return
            if self.path.rstrip("/").endswith("/models"):
                return self._send(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "created": 0,
                                                                    "owned_by": "domain"}]})
            self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})

        def do_POST(self):
            if not self._authorized():
                return
            body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
            if not self.path.endswith("/chat/completions"):
                return self._send(404, {"error": {"message": f"no route {self.path}", "type": "invalid_request_error"}})
            text = reply(domain, body)
            prompt_tokens = sum(len(m["content"].split()) for m in body["messages"])
            self._send(200, {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                             "model": body.get("model", MODEL),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}],
                             "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(text.split()),
                                       "total_tokens": prompt_tokens + len(text.split())}})

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--domain", required=True)
    ap.add_argument("--port", type=int, default=8100)
    args = ap.parse_args(argv)
    server = make_server(Domain(args.domain), args.port, os.environ.get("TEACHER_API_KEY"))
    print(f"domain teacher on http://127.0.0.1:{server.server_address[1]}/v1", flush=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
