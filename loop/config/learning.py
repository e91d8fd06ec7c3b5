"""How the loop learns: the simulated world and its users, data selection, LoRA distillation, the
draft's co-training, the merge and its proofs, and the validation gate."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, model_validator

from loop.config.base import Section


class BootstrapConfig(Section):
    """The cycle-0 student (loop/sim/bootstrap.py): `loopctl models fetch` teaches the fetched base
    the world at `epoch` and merges it; that model is the student every cycle starts from."""
    epoch: int = Field(default=0, ge=0)
    max_steps: int = Field(default=60, ge=1)
    base_path: str | None = None
    """Where the fetched base goes (relative to storage.root); default: student.path + "-base"."""


class WorldConfig(Section):
    seed: int = 0
    num_entities: int = Field(default=20, ge=1)
    drift_fraction: float = Field(default=0.3, ge=0, le=1)
    """Share of facts that change at each epoch."""
    new_per_epoch: int = Field(default=2, ge=0)
    bootstrap: BootstrapConfig | None = None
    """Set: the student starts knowing the world at `bootstrap.epoch` (a static snapshot that falls
    behind as the world drifts); unset: it starts knowing none of it."""


class TrafficConfig(Section):
    simulate: bool = True
    """True: a simulation (`simulator`, the demo's drifting world of the `world:` section) sends each
    cycle's traffic through the gateway, grades it and measures accuracy. False: real users send it;
    cycles read the trace log and feedback, the gate scores the suites and held-out teacher labels, and
    the canary decides on real traffic (`promotion.canary_wait_s`); nothing of loop/sim is imported."""
    simulator: str = Field(default="loop.sim.demo:SimulatedWorld", pattern=r"^[\w.]+:\w+$")
    """`module:Class` of the simulation that drives a `simulate: true` config, loaded by that path
    (the product never imports it): its teacher, its users and its setup steps."""
    users: int = Field(default=8, ge=1)
    concurrency: int = Field(default=8, ge=1)
    max_tokens: int = Field(default=32, ge=1)
    requests: int = Field(default=0, ge=0)
    """Questions per round of simulated traffic (the traffic stage and each canary round): every
    training phrasing of every fact once, then popular facts asked again and routine questions up to
    this many. 0: every training phrasing once, nothing more."""
    routine_share: float = Field(default=0.0, ge=0, lt=1)
    """Share of a round that is routine questions the student already answers (loop/sim/world.py)."""


class TrainingConfig(Section):
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
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"
    """`bf16-mixed`: forward and backward under bfloat16 autocast, fp32 weights and optimizer (1.5x
    faster on CPUs with AVX512-BF16 or AMX, and on GPUs; ~20x slower on a CPU without them, which
    emulates bfloat16); `auto`: bf16-mixed where it is native (loop/platform.py), else fp32. The merge
    and its proofs stay in fp32/fp64."""
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
    anchor_weight: float = Field(default=0.0, ge=0)
    """Weight of the anchor to the base: KL(base || student) on the base's own answers to general
    prompts (`data.general_replay` of them), in a batch of `anchor_batch_size` beside every training
    batch, the base being the student with its adapter off. 0: those rows are trained on as text,
    mixed into the batches."""
    anchor_batch_size: int = Field(default=4, ge=1)
    reg_weight: float = Field(default=0.01, ge=0)
    """The defaults (replay 1.0, l2 0.01) are what `loopctl bench distill` measured: one cycle on a
    drifted world kept every earlier fact and general answer (regression -7 pts) where training
    without them lost 32 pts."""


class JudgeConfig(Section):
    """The teacher as a judge (loop/teacher/judge.py): grades an answer against a rubric, 0-10."""
    rubric: str = ("Grade the ASSISTANT ANSWER to the USER QUESTION for correctness and helpfulness. If a "
                   "REFERENCE is given, an answer that contradicts it is wrong. Reply with one integer from 0 "
                   "(wrong or useless) to 10 (fully right), and nothing else.")
    max_tokens: int = Field(default=8, ge=1)
    """A reply cut off at this many tokens is no grade (scored 0 and counted as failed)."""
    pass_score: float | None = Field(default=None, ge=0, le=1)
    """None: an answer scores its grade / 10; set: 1 when grade / 10 reaches this, else 0."""


class OutcomeJudgeConfig(JudgeConfig):
    """`data.judge`: the teacher grades answered requests no user rated (loop/control/judged.py);
    the grades are outcomes for selection and the promotion controller, marked `judge`."""
    sample_fraction: float = Field(default=0.2, gt=0, le=1)
    """Share of the unrated answered requests graded (seeded by request id)."""
    max_requests: int = Field(default=200, ge=1)
    """Grades per cycle's data stage, and per canary check."""
    budget_usd: float = Field(default=1.0, gt=0)
    """Teacher spend per cycle's data stage, and per canary check; grading stops when it is reached."""


class DataConfig(Section):
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
    general_replay: int = Field(default=0, ge=0)
    """Prompts of the general replay set answered by the original base model itself (greedy, once per
    base) and trained on beside the cycle's data, without an end-of-turn token: free labels meant to
    hold the student to the base's general answers. None of them is in the base regression suite.
    With training.anchor_weight > 0 they are the anchor's rows (matched to the base's distribution in
    a batch of their own); without, they are mixed into the batches as text. Measured on the
    expense-policy domain from SmolLM2-135M (lr 1e-3, `configs/byo.yaml`, README): mixed as text, 48
    lifted base-regression only 0.09 -> 0.22 and cut held-out recall 0.83 -> 0.17; all 104 as anchor
    rows (weight 5, batch 8, 60 steps) 0.11 -> 0.72 with held-out kept at 0.75. 0 (off) by default:
    the demo's student is the cycle-0 student, not a base to hold to."""
    general_replay_prompts: str | None = None
    """JSONL of {"messages"} (None: the 104 prompts shipped in loop/data/data/general_replay_prompts.jsonl)."""
    general_replay_max_tokens: int = Field(default=48, ge=1)
    judge: OutcomeJudgeConfig | None = None
    """Set: outcomes where feedback is thin, the teacher grading unrated answers (needs an HTTP
    teacher, teacher.kind openai or reference). None (off): only users' feedback is an outcome."""


class DraftTrainingConfig(Section):
    enabled: bool = True
    """Co-train the draft after every student checkpoint (off: versions keep the previous draft)."""
    max_steps: int = Field(default=30, ge=1)
    learning_rate: float = Field(default=2e-4, gt=0)
    batch_size: int = Field(default=8, ge=1)
    max_seq_len: int = Field(default=128, ge=8)
    max_new_tokens: int = Field(default=32, ge=1)
    """Length of the student's own answers the draft is distilled on (and acceptance is measured on)."""
    precision: Literal["auto", "fp32", "bf16-mixed"] = "auto"
    """As training.precision, for the student's answers and logits and the draft's training step
    (acceptance is always measured in fp32)."""
    num_speculative_tokens: int = Field(default=3, ge=1, le=16)
    """k for the acceptance measurement (expected accepted tokens per step of k proposals)."""
    acceptance_questions: int = Field(default=32, ge=1)
    """Held-out questions the stale and co-trained drafts' acceptance is measured on (each a short
    assisted generation with the new student; fewer is faster and noisier)."""
    seed: int = 0
    torch_threads: int | None = Field(default=None, ge=1)


class MergeConfig(Section):
    max_abs_logit_diff: float = Field(default=1e-4, gt=0)
    """Merged vs unmerged (peft) logits on the probe prompts, both in float64, must agree within this
    (an unquantized base)."""
    max_kl_quantized: float = Field(default=1e-2, gt=0)
    """For a quantized base (block FP8, MXFP4), whose merged weights are requantized: the mean
    KL(reference || merged) per probe position must stay below this."""
    num_probes: int = Field(default=4, ge=1)


class SuiteConfig(Section):
    """One evaluation suite of the gate (loop/suites.py): a JSONL file of
    `{"messages", "reference"?, "grader"?, "threshold"?}` lines."""
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    """Names the suite in the ValidationReport, MLflow (`suite.<name>.*` metrics) and the cycle report."""
    path: str
    """The file. A relative path is taken from the config file's directory; `{root}` is storage.root and
    `{cycle}` the cycle's number (0001, ...), for a suite its author writes anew for every cycle. A file
    without `{cycle}` is checked whenever the config is loaded; one with it, when the gate reads it."""
    kind: Literal["skill", "regression"]
    """`skill`: what the cycle should teach (the candidate must beat the champion by `min_gain`);
    `regression`: what it must not forget (at most `max_drop` below its `baseline`)."""
    grader: Literal["exact", "contains", "regex", "token_f1", "judge"] = "token_f1"
    """For lines that name none: `exact`, `contains` or `regex` against `reference`; `token_f1` (word
    overlap with `reference`); `judge` (the teacher grades against `validation.judge.rubric`)."""
    min_score: float | None = Field(default=None, ge=0, le=1)
    """The candidate's mean score must reach this too (None: no absolute floor)."""
    min_gain: float | None = None
    """`skill`: candidate minus champion must be at least this (None: validation.min_accuracy_gain)."""
    max_drop: float | None = Field(default=None, ge=0, le=1)
    """`regression`: the candidate may score at most this below the baseline (None:
    validation.max_regression_drop)."""
    baseline: Literal["base", "champion"] = "base"
    """`regression`: what the drop is measured against: the original base model (forgetting, the
    default) or the current champion (for knowledge the base never had, such as earlier cycles' facts)."""

    @model_validator(mode="after")
    def _file(self, info: ValidationInfo) -> "SuiteConfig":
        base = (info.context or {}).get("config_dir")
        if base and "{root}" not in self.path and not Path(self.path).is_absolute():
            self.path = str((Path(base) / self.path).resolve())
        if "{cycle}" not in self.path and "{root}" not in self.path:
            from loop.suites import SuiteError, load_suite

            try:
                load_suite(self.path, self.name, self.kind, self.grader)
            except SuiteError as e:
                raise ValueError(f"suite '{self.name}': {e}") from None
        return self


class ValidationConfig(Section):
    suites: list[SuiteConfig] = []
    """The gate's evaluation suites; every one is scored for candidate and champion. Besides them the
    gate has the cycle's held-out teacher labels (a skill suite `heldout-teacher`, when
    data.heldout_fraction > 0) and, unless base_regression is off, the base regression suite."""
    base_regression: bool = True
    """The suite `base-regression`, made once (kept under storage.root/suites/) from the original base
    model's own greedy answers to `regression_prompts`, an answer passing when its token F1 with the
    base's reaches 0.5: forgetting measured against the base, for any model."""
    regression_prompts: str | None = None
    """JSONL of {"messages"} for the base regression suite (None: the 121 general prompts shipped in
    loop/validate/data/general_prompts.jsonl)."""
    judge: JudgeConfig = JudgeConfig()
    min_accuracy_gain: float = 0.0
    """A skill suite's candidate score minus the champion's must be at least this (0: must not fall),
    unless the suite sets its own min_gain."""
    max_regression_drop: float = Field(default=0.05, ge=0, le=1)
    """A regression suite's score may fall at most this below its baseline, unless the suite sets its
    own max_drop (0.05: 6 of the 121 prompts of the base regression suite)."""
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
