"""How the loop learns: the simulated world and its users, data selection, LoRA distillation, the
draft's co-training, the merge and its proofs, and the validation gate."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from loop.config.base import Section


class BootstrapConfig(Section):
    """The cycle-0 student (loop/models/bootstrap.py): `loopctl models fetch` teaches the fetched base
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


class DraftTrainingConfig(Section):
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


class MergeConfig(Section):
    max_abs_logit_diff: float = Field(default=1e-4, gt=0)
    """Merged vs unmerged (peft) logits on the probe prompts, both in float64, must agree within this
    (an unquantized base)."""
    max_kl_quantized: float = Field(default=1e-2, gt=0)
    """For a quantized base (block FP8, MXFP4), whose merged weights are requantized: the mean
    KL(reference || merged) per probe position must stay below this."""
    num_probes: int = Field(default=4, ge=1)


class ValidationConfig(Section):
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
