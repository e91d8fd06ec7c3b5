"""The reference teacher: a stand-in for a frontier API that knows the world's current epoch.

It speaks the OpenAI chat-completions protocol (Serve mounts it under `/teacher`), so the loop talks
to it only through the `openai` client, exactly as it would to a real frontier endpoint. The epoch is
set through `reconfigure` (Serve `user_config`): the frontier "was updated".
"""
from __future__ import annotations

import functools

from fastapi import FastAPI, Request
from starlette.responses import JSONResponse

from loop.config import LoopConfig
from loop.serving.errors import BadRequest
from loop.serving.protocol import cut_at_stop, parse_chat_request
from loop.serving.responses import Choice, chat_completion_body
from loop.sim.world import World
from loop.traces.log import new_request_id

api = FastAPI(title="continual-loop reference teacher", version="0.1")
APP_NAME = "teacher"
ROUTE = "/teacher"


class ReferenceTeacher:
    def __init__(self, seed: int, num_entities: int, drift_fraction: float, new_per_epoch: int,
                 model: str = "reference-teacher", tokenizer_dir: str | None = None):
        """`tokenizer_dir`: count usage in this tokenizer (the student's, chat template included, as the
        gateway counts a request), so the demo's cost report prices teacher calls and student requests
        alike; without it, words."""
        self.world_args = dict(seed=seed, num_entities=num_entities, drift_fraction=drift_fraction,
                               new_per_epoch=new_per_epoch)
        self.tokenizer_dir = tokenizer_dir
        self.model = model
        self.tokenizer = None
        if tokenizer_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
        self.world = World(epoch=0, **self.world_args)
        self.calls = 0

    def reconfigure(self, config: dict) -> None:
        epoch = int(config.get("epoch", 0))
        if epoch != self.world.epoch:
            self.world = World(epoch=epoch, **self.world_args)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        try:
            req = parse_chat_request(await request.body())
            if req.stream:
                raise BadRequest("the reference teacher does not stream; send stream: false", param="stream")
            # Its answers are looked up, not sampled: nothing to score, to bias, to sample n times or to shape.
            for name in ("logprobs", "logit_bias", "response_format"):
                if getattr(req, name):
                    raise BadRequest(f"{name}: the reference teacher does not support it", param=name,
                                     code="unsupported_parameter")
            if req.n > 1:
                raise BadRequest("n: the reference teacher answers once; send n: 1", param="n")
        except BadRequest as e:
            return e.response()
        self.calls += 1
        question = next((m.content for m in reversed(req.messages) if m.role == "user"), "")
        answer = cut_at_stop(self.world.answer(question), req.stop)
        n_prompt, n_completion = self._usage([m.as_dict() for m in req.messages], answer)
        return JSONResponse(chat_completion_body(new_request_id(), self.model, [Choice(answer)], n_prompt,
                                                 n_completion))

    def _usage(self, messages: list[dict], answer: str) -> tuple[int, int]:
        if self.tokenizer is None:
            return sum(len(m["content"].split()) for m in messages), len(answer.split())
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        count = len(self.tokenizer(prompt, add_special_tokens=False)["input_ids"])
        return count, len(self.tokenizer(answer, add_special_tokens=False)["input_ids"]) + 1  # + end of turn

    @api.get("/v1/models")
    async def models(self):
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                         "owned_by": "continual-loop", "epoch": self.world.epoch,
                                                         "world": self.world_args,
                                                         "tokenizer_dir": self.tokenizer_dir}]})


@functools.cache
def _ingress_teacher():
    """The Serve ingress class, made once: a second `serve.ingress(api)` would mount the routes again."""
    from ray import serve

    return serve.ingress(api)(ReferenceTeacher)


def deploy_teacher(cfg: LoopConfig, epoch: int) -> str:
    """Deploy (or move to `epoch`) the reference teacher as the Serve app `teacher` under `/teacher`;
    returns its OpenAI base URL."""
    from ray import serve

    from loop.cluster import run_app

    w = cfg.world
    url = f"http://{cfg.serving.host}:{cfg.serving.port}{ROUTE}/v1"
    wanted = {"id": cfg.teacher.model, "epoch": epoch, "tokenizer_dir": str(cfg.model_path(cfg.student)),
              "world": dict(seed=w.seed, num_entities=w.num_entities, drift_fraction=w.drift_fraction,
                            new_per_epoch=w.new_per_epoch)}
    if _serving(url, wanted):  # a restarted driver: the running teacher is this one (a redeploy is ~15 s)
        print(f"[loop] the reference teacher (epoch {epoch}) is already serving: kept", flush=True)
        return url
    app = serve.deployment(
        _ingress_teacher(), name="reference-teacher",
        ray_actor_options={"num_cpus": 0}, user_config={"epoch": epoch},
    ).bind(w.seed, w.num_entities, w.drift_fraction, w.new_per_epoch, cfg.teacher.model,
           str(cfg.model_path(cfg.student)))
    run_app(app, APP_NAME, ROUTE)
    return url


def _serving(url: str, wanted: dict) -> bool:
    """Whether the teacher app answering at `url` is already the one `wanted` describes (model, epoch,
    world, tokenizer), so deploying it again would change nothing."""
    import httpx

    from loop.cluster import running

    if not running(APP_NAME):
        return False
    try:
        served = httpx.get(f"{url}/models", timeout=5).json()["data"][0]
    except (httpx.HTTPError, ValueError, KeyError, IndexError):
        return False
    return {k: served.get(k) for k in wanted} == wanted
