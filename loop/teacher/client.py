"""The teacher as any OpenAI-compatible endpoint, reached only through the `openai` client.

`TeacherLabeler` is the Ray Data `map_batches` UDF that labels prompts; `TeacherUnreachable` stops a
cycle with one line that names the fix. Caching, cost accounting and logprobs come with the
training issue.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

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


class TeacherLabeler:
    """Ray Data UDF: adds the teacher's `completion` (and `label_error`) to a batch of `messages`."""

    def __init__(self, cfg: dict, base_url: str, api_key: str):
        # The key comes from the driver: labelling actors may run on nodes without its environment.
        self.cfg = TeacherConfig.model_validate(cfg)
        self.client = make_client(self.cfg, base_url, api_key)
        self.pool = ThreadPoolExecutor(self.cfg.concurrency)

    def _one(self, messages) -> tuple[str, str]:
        try:
            return ask(self.client, self.cfg.model, list(messages), self.cfg.max_tokens), ""
        except Exception as e:  # noqa: BLE001 - recorded per row; the driver decides what to do
            return "", f"{e.__class__.__name__}: {str(e)[:200]}"

    def __call__(self, batch: dict) -> dict:
        import json

        results = list(self.pool.map(self._one, [json.loads(m) for m in batch["messages"]]))
        batch["completion"] = [c for c, _ in results]
        batch["label_error"] = [e for _, e in results]
        return batch
