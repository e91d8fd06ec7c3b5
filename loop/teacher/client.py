"""The teacher as any OpenAI-compatible endpoint, reached only through the `openai` client.

`OpenAITeacher.label` asks for one answer (with top-k log-probabilities when configured), through
a cache keyed by teacher + prompt + parameters (a re-run never pays twice), and accounts tokens and
cost. Retries with backoff on 408/409/429/5xx, timeouts and connection errors are the `openai`
client's own (`teacher.max_retries`). `TeacherLabeler` is the Ray Data `map_batches` UDF that labels
prompts with it; `TeacherUnreachable` stops a cycle with one line that names the fix.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from loop.config import TeacherConfig


class TeacherUnreachable(RuntimeError):
    pass


def teacher_key(cfg: TeacherConfig) -> str:
    key = os.environ.get(cfg.api_key_env, "") if cfg.api_key_env else ""
    if cfg.api_key_env and not key:
        raise TeacherUnreachable(f"teacher.api_key_env names {cfg.api_key_env}, which is not set: export it")
    return key


def make_client(cfg: TeacherConfig, base_url: str, api_key: str | None = None):
    import openai

    key = teacher_key(cfg) if api_key is None else api_key
    return openai.OpenAI(base_url=base_url, api_key=key or "unused", timeout=cfg.timeout_s,
                         max_retries=cfg.max_retries)


def ask(client, model: str, messages: list[dict], max_tokens: int) -> str:
    resp = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, temperature=0)
    return resp.choices[0].message.content or ""


def check_reachable(cfg: TeacherConfig, base_url: str) -> None:
    import openai

    try:
        make_client(cfg, base_url).with_options(max_retries=1, timeout=10).models.list()
    except openai.APIConnectionError as e:
        raise TeacherUnreachable(f"teacher at {base_url} is unreachable ({e.__class__.__name__}); "
                                 "check teacher.base_url in the config or start the endpoint") from None
    except openai.APIStatusError as e:
        raise TeacherUnreachable(f"teacher at {base_url} answered HTTP {e.status_code} to GET /models; "
                                 "check teacher.base_url and teacher.api_key_env") from None


@dataclass
class Label:
    completion: str = ""
    error: str = ""
    """Why there is no usable answer ("" when there is one)."""
    top_logprobs: list | None = None
    """Per answer token: [[token, logprob], ...] of the teacher's top k (None when not given)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    cached: bool = False


class TeacherCache:
    """Answers by key in one sqlite file; safe across threads and processes (WAL mode)."""

    def __init__(self, path: str | Path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        self._db.commit()
        self._lock = threading.Lock()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT value FROM answers WHERE key = ?", (key,)).fetchone()
        return json.loads(row[0]) if row else None

    def put(self, key: str, value: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?)", (key, json.dumps(value)))
            self._db.commit()


class _RateLimit:
    """At most `per_s` starts per second across threads (None: unlimited)."""

    def __init__(self, per_s: float | None):
        self.interval, self.next, self.lock = (1.0 / per_s if per_s else 0.0), 0.0, threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self.lock:
            now = time.monotonic()
            start = max(now, self.next)
            self.next = start + self.interval
        time.sleep(max(0.0, start - now))


class OpenAITeacher:
    def __init__(self, cfg: TeacherConfig, base_url: str, api_key: str, cache_path: str | Path | None = None,
                 namespace: str = ""):
        """`namespace` is part of every cache key: what makes one teacher's answers differ from another
        time's beyond its model name (the reference teacher's world epoch)."""
        self.cfg, self.base_url, self.namespace = cfg, base_url, namespace
        self.client = make_client(cfg, base_url, api_key)
        self.cache = TeacherCache(cache_path) if cfg.cache and cache_path else None
        self.rate = _RateLimit(cfg.max_requests_per_s)
        self._logprobs = cfg.top_logprobs > 0

    def params(self) -> dict:
        p = {"model": self.cfg.model, "max_tokens": self.cfg.max_tokens, "temperature": 0}
        if self._logprobs:
            p.update(logprobs=True, top_logprobs=self.cfg.top_logprobs)
        return p

    def key(self, messages: list[dict]) -> str:
        blob = json.dumps({"base_url": self.base_url, "namespace": self.namespace, "messages": messages,
                           **self.params()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()

    def label(self, messages: list[dict]) -> Label:
        """The teacher's answer to `messages`; failures come back as `Label.error`, never raised."""
        key = self.key(messages)
        if self.cache is not None and (hit := self.cache.get(key)) is not None:
            return Label(**{**hit, "cached": True, "cost_usd": 0.0})
        try:
            label = self._call(messages)
        except Exception as e:  # noqa: BLE001 - recorded per row; the caller decides what to do
            return Label(error=f"{e.__class__.__name__}: {str(e)[:200]}")
        if not label.error and self.cache is not None:
            self.cache.put(self.key(messages), asdict(label))
        return label

    def _call(self, messages: list[dict]) -> Label:
        import openai

        self.rate.wait()
        try:
            resp = self.client.chat.completions.create(messages=messages, **self.params())
        except openai.BadRequestError as e:
            if not self._logprobs or "logprob" not in str(e).lower():
                raise
            self._logprobs = False  # this endpoint gives no log-probabilities: sequence-level only
            resp = self.client.chat.completions.create(messages=messages, **self.params())
        choice = resp.choices[0] if resp.choices else None
        text = choice.message.content if choice is not None else None
        usage = resp.usage
        n_in, n_out = (usage.prompt_tokens, usage.completion_tokens) if usage else (0, 0)
        cost = (n_in * self.cfg.usd_per_million_prompt_tokens + n_out * self.cfg.usd_per_million_completion_tokens) / 1e6
        problem = label_problem(text, choice.finish_reason if choice is not None else None, self.cfg.max_tokens)
        if problem:
            return Label(error=problem, prompt_tokens=n_in, completion_tokens=n_out, cost_usd=cost)
        top = None
        if self._logprobs and choice.logprobs is not None and choice.logprobs.content:
            top = [[[t.token, t.logprob] for t in tok.top_logprobs] for tok in choice.logprobs.content]
        return Label(completion=text, top_logprobs=top, prompt_tokens=n_in, completion_tokens=n_out, cost_usd=cost)


def label_problem(text, finish_reason: str | None, max_tokens: int) -> str:
    """Why an answer must not be trained on ("" when it may): missing, empty, cut off, or garbled."""
    if not isinstance(text, str) or not text.strip():
        return "empty or missing answer"
    if finish_reason == "length":
        return f"answer cut off at teacher.max_tokens ({max_tokens}); raise it"
    if "\ufffd" in text or any(ord(c) < 32 and c not in "\n\r\t" for c in text):
        return "garbled answer (invalid or control characters)"
    return ""


def split_labels(rows: list[dict], max_failed_fraction: float) -> tuple[list[dict], list[dict]]:
    """Labelled rows that may be trained on, and those that failed (a `label_error`); raises
    `LabelsFailed` when more than `max_failed_fraction` failed: a teacher that broken is not one to
    learn from."""
    good = [r for r in rows if not r["label_error"]]
    failed = [r for r in rows if r["label_error"]]
    if rows and len(failed) > max_failed_fraction * len(rows):
        raise LabelsFailed(f"the teacher failed {len(failed)} of {len(rows)} labels (first: "
                           f"{failed[0]['label_error']}); more than data.max_failed_fraction ({max_failed_fraction}): "
                           "check the teacher, or raise it", failed)
    return good, failed


class LabelsFailed(RuntimeError):
    def __init__(self, message: str, failed: list[dict]):
        super().__init__(message)
        self.failed = failed


class TeacherLabeler:
    """Ray Data UDF: adds the teacher's `completion`, `label_error`, `top_logprobs` (JSON), token
    counts, `cost_usd` and `cached` to a batch of `messages` (JSON)."""

    def __init__(self, cfg: dict, base_url: str, api_key: str, cache_path: str | None = None, namespace: str = ""):
        # The key comes from the driver: labelling actors may run on nodes without its environment.
        self.cfg = TeacherConfig.model_validate(cfg)
        self.teacher = OpenAITeacher(self.cfg, base_url, api_key, cache_path, namespace)
        self.pool = ThreadPoolExecutor(self.cfg.concurrency)

    def __call__(self, batch: dict) -> dict:
        return label_columns(batch, list(self.pool.map(self.teacher.label, [json.loads(m) for m in batch["messages"]])))


def label_columns(batch: dict, labels: list[Label]) -> dict:
    """The labelling columns every teacher adds to a batch of `messages`."""
    batch["completion"] = [lb.completion for lb in labels]
    batch["label_error"] = [lb.error for lb in labels]
    batch["top_logprobs"] = [json.dumps(lb.top_logprobs) if lb.top_logprobs else "" for lb in labels]
    batch["prompt_tokens"] = [lb.prompt_tokens for lb in labels]
    batch["completion_tokens"] = [lb.completion_tokens for lb in labels]
    batch["cost_usd"] = [lb.cost_usd for lb in labels]
    batch["cached"] = [lb.cached for lb in labels]
    return batch
