"""Serving benchmark: raw vLLM `AsyncLLM` vs the same engine behind the gateway, one adapter vs an
A/B split over two adapters, lost trace records, and checkpoint-to-live times.

All figures come from one run on one machine, against the baseline named beside each ratio:
  gateway_over_engine       output tokens/s through Serve + gateway + HTTP / raw AsyncLLM, concurrency 16
  p50_added_ms              median request latency through the gateway minus the raw engine's
  ab_two_adapters_over_one  tokens/s with a 50/50 split over two adapters / one adapter (same engine)
  lost_trace_records        responses answered minus trace rows found for them (must be 0)
  adapter_to_live_s         new adapter on disk -> first answer from it through the gateway (hot-load)
  redeploy_to_live_s        the naive path: a fresh engine deployment -> its first answer
"""
from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from loop.config import LoopConfig, hash_api_key

QUESTIONS = ["What is the price of the {}?", "Who owns the {}?", "Where is the {} made?",
             "What is the latest version of the {}?"]
NAMES = ["Zorvex widget", "Quillon service", "Bradex engine", "Marfen toolkit", "Palrix sensor",
         "Dunkel platform", "Sorvin module", "Talgru gadget"]


def _prompts(n: int) -> list[str]:
    return [QUESTIONS[i % len(QUESTIONS)].format(NAMES[(i // len(QUESTIONS)) % len(NAMES)]) + f" (#{i})"
            for i in range(n)]


def make_adapter(base_dir: Path, out_dir: Path, rank: int, seed: int, std: float = 0.01) -> Path:
    """A random LoRA adapter on every linear layer (what a training step would leave on disk)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=std)
    model.save_pretrained(out_dir)
    return out_dir


async def _bounded(concurrency: int, jobs):
    sem = asyncio.Semaphore(concurrency)

    async def one(job):
        async with sem:
            return await job()

    return await asyncio.gather(*[one(j) for j in jobs])


def _rate(results: list[tuple[float, int]], wall: float) -> dict:
    lat = [r[0] for r in results]
    return {"tokens_per_s": sum(r[1] for r in results) / wall, "p50_ms": statistics.median(lat) * 1000,
            "requests": len(results), "wall_s": wall}


async def _raw_engine(cfg: LoopConfig, adapter: Path, prompts: list[str], max_tokens: int, concurrency: int) -> dict:
    from loop.serving.engine import StudentEngine

    engine = StudentEngine(str(cfg.model_path(cfg.student)), cfg.serving.engine, cfg.student.dtype)
    try:
        async def job(i, q):
            t = time.perf_counter()
            g = await engine.generate([{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0,
                                      adapter_path=str(adapter), request_id=f"raw-{i}-{time.time_ns()}")
            return time.perf_counter() - t, g.completion_tokens

        await _bounded(concurrency, [lambda i=i, q=q: job(i, q) for i, q in enumerate(prompts[:concurrency])])
        t0 = time.perf_counter()
        results = await _bounded(concurrency, [lambda i=i, q=q: job(i, q) for i, q in enumerate(prompts)])
        return _rate(results, time.perf_counter() - t0)
    finally:
        engine.shutdown()


async def _through_gateway(url: str, key: str, model: str, prompts: list[str], max_tokens: int,
                           concurrency: int, users: int) -> tuple[dict, list[str]]:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=600)

    async def job(i, q):
        t = time.perf_counter()
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": q}], max_tokens=max_tokens, temperature=0,
            user=f"bench-user-{i % users}")
        resp = raw.parse()
        return time.perf_counter() - t, resp.usage.completion_tokens, raw.headers["x-request-id"]

    await _bounded(concurrency, [lambda i=i, q=q: job(i, q) for i, q in enumerate(prompts[:concurrency])])
    t0 = time.perf_counter()
    results = await _bounded(concurrency, [lambda i=i, q=q: job(i, q) for i, q in enumerate(prompts)])
    return _rate([(r[0], r[1]) for r in results], time.perf_counter() - t0), [r[2] for r in results]


def _version(n: int, adapter: Path | None) -> dict:
    return {"version": f"bench/{n}", "number": n, "adapter_path": str(adapter) if adapter else None,
            "adapter_digest": "", "checkpoint_digest": "", "training_run_id": "", "deployed_at": ""}


def run(cfg: LoopConfig, requests: int = 64, max_tokens: int = 32, concurrency: int = 16) -> dict:
    import ray
    from ray import serve

    from loop.cluster import ENGINE_APP, GATEWAY_APP, delete_apps, deploy_gateway, init_ray, start_serve
    from loop.models.fetch import read_manifest
    from loop.serving.rollouts import RolloutStore
    from loop.traces.log import TraceLog, read_traces

    base = cfg.model_path(cfg.student)
    read_manifest(base)
    work = Path(tempfile.mkdtemp(prefix="bench-serving-", dir=cfg.storage.path()))
    rank = cfg.training.lora_rank
    adapters = [make_adapter(base, work / f"adapter-{i}", rank, seed=i) for i in range(3)]
    prompts = _prompts(requests)
    out: dict = {"requests": requests, "max_tokens": max_tokens, "concurrency": concurrency,
                 "student": cfg.student.name}

    print("[bench] raw AsyncLLM engine", flush=True)
    out["engine"] = asyncio.run(_raw_engine(cfg, adapters[0], prompts, max_tokens, concurrency))

    init_ray(cfg)
    start_serve(cfg)
    trace_log = ray.remote(TraceLog).options(num_cpus=0).remote(str(work / "traces"))
    store = ray.remote(RolloutStore).options(num_cpus=0).remote()
    tenant = cfg.tenants[0]
    endpoint = tenant.endpoints[0].id
    key = "sk-bench-" + str(time.time_ns())
    cfg = cfg.model_copy(deep=True)
    cfg.tenants = [tenant.model_copy(update={"api_key_hashes": [hash_api_key(key)]})]
    url = f"http://{cfg.serving.host}:{cfg.serving.port}/v1"
    model = f"model-{endpoint}"
    one = {endpoint: {"champion": _version(1, adapters[0]), "challenger": None, "challenger_weight": 0.0,
                      "rollout_id": "one"}}
    ab = {endpoint: {"champion": _version(1, adapters[0]), "challenger": _version(2, adapters[1]),
                     "challenger_weight": 0.5, "rollout_id": "ab"}}
    try:
        t0 = time.perf_counter()
        deploy_gateway(cfg, trace_log, one, rollout_store=store)
        out["services_up_s"] = time.perf_counter() - t0
        print("[bench] gateway, one adapter", flush=True)
        out["gateway_one"], ids_one = asyncio.run(_through_gateway(url, key, model, prompts, max_tokens,
                                                                   concurrency, users=64))
        print("[bench] gateway, A/B over two adapters", flush=True)
        deploy_gateway(cfg, trace_log, ab, rollout_store=store)
        out["gateway_ab"], ids_ab = asyncio.run(_through_gateway(url, key, model, prompts, max_tokens,
                                                                 concurrency, users=64))
        traced = {r["request_id"] for r in read_traces(work / "traces")}
        answered = ids_one + ids_ab
        out["lost_trace_records"] = sum(1 for i in answered if i not in traced)
        out["answered"] = len(answered)

        print("[bench] adapter to live (hot-load)", flush=True)
        t0 = time.perf_counter()
        fresh = make_adapter(base, work / "adapter-new", rank, seed=99)
        deploy_gateway(cfg, trace_log, {endpoint: {"champion": _version(3, fresh), "challenger": None,
                                                   "challenger_weight": 0.0, "rollout_id": "new"}},
                       rollout_store=store)
        _, ids = asyncio.run(_through_gateway(url, key, model, prompts[:1], 8, 1, users=1))
        out["adapter_to_live_s"] = time.perf_counter() - t0

        print("[bench] naive redeploy (fresh engine deployment)", flush=True)
        delete_apps([ENGINE_APP, GATEWAY_APP], blocking=True)
        t0 = time.perf_counter()
        deploy_gateway(cfg, trace_log, one)
        asyncio.run(_through_gateway(url, key, model, prompts[:1], 8, 1, users=1))
        out["redeploy_to_live_s"] = time.perf_counter() - t0
    finally:
        serve.shutdown()
        ray.shutdown()
    e, g, a = out["engine"], out["gateway_one"], out["gateway_ab"]
    out["gateway_over_engine"] = g["tokens_per_s"] / e["tokens_per_s"]
    out["p50_added_ms"] = g["p50_ms"] - e["p50_ms"]
    out["ab_two_adapters_over_one"] = a["tokens_per_s"] / g["tokens_per_s"]
    out["targets"] = {"gateway_over_engine": ">= 0.85", "ab_two_adapters_over_one": ">= 0.8",
                      "lost_trace_records": "== 0", "adapter_to_live_s": "<= 10"}
    return out
