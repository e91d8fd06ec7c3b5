"""Merge a LoRA adapter into its base, architecture-aware and streaming, and prove the merge.

Resolution first (`layouts.plan`): every adapter module gets a known layout, or the merge is refused
naming the module; the adapter is checked for missing files, NaN/Inf, rank and shapes; the base for
missing shards. Nothing is written until all of that passes. Then the base streams through the edits
shard by shard (`checkpoint.write_merged`) into `<out>.tmp`, and the proofs run on what was written:
  1. logits of the merged model vs the unmerged reference (peft on the base; for a quantized base,
     peft on the dequantized base) on probe prompts, in float64: max |diff| (and KL) within tolerance;
  2. the delta is present: the merged model is closer to the reference than to the base;
  3. no NaN/Inf; tensor names, shapes, dtypes, config and tokenizer as the base's (an untied head is
     the one addition);
  4. with an engine config (`loopctl merge` by default): the serving engine (vLLM) loads the merged
     directory and its greedy answers to the probes equal the reference's (peft, unmerged). In a
     cycle this proof is the validate stage's serving parity instead (the same engine, started once,
     with the version's draft attached), and its result is written back into the MergeReport.
Only a merge that passes every proof is renamed to `out`; the MergeReport (JSON beside it) says
what was done and, on failure, every reason.
"""
from __future__ import annotations

import json
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loop.config import MergeConfig
from loop.models.digest import dir_digest

PROBES = ["What is the price of the product?", "Who owns the service?", "Tell me something useful.",
          "What is the capital of France?", "Where is it made?", "Which version is current?"]
QUANTIZED = {"fp8", "mxfp4"}


class MergeFailed(RuntimeError):
    pass


@dataclass
class MergeReport:
    base_dir: str
    adapter_dir: str
    merged_dir: str
    max_abs_logit_diff: float = float("nan")
    """Merged model vs the unmerged reference, on the probe prompts (float64 forward)."""
    kl_to_reference: float = float("nan")
    """Mean KL(reference || merged) per probe position."""
    merged_to_reference: float = float("nan")
    merged_to_base: float = float("nan")
    """Mean |logit| distance to the reference and to the plain base: the delta must be present."""
    finite: bool = False
    quantized: str | None = None
    layouts: dict = field(default_factory=dict)
    """How many adapter deltas each layout placed (see loop/merge/layouts.py)."""
    engine_identical: str = ""
    """Proof 4: "n/N" probes whose greedy answer from the serving engine on the merged directory
    equals the reference's; empty when not run (engine_note says why or who ran it)."""
    engine_note: str = ""
    tensors_changed: int = 0
    peak_tensor_mb: float = 0.0
    merged_digest: str = ""
    seconds: float = 0.0
    merge_seconds: float = 0.0
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Merger:
    def __init__(self, cfg: MergeConfig):
        self.cfg = cfg

    def run(self, base_dir: Path, adapter_dir: Path, out_dir: Path, engine: dict | None = None) -> MergeReport:
        """`engine`: an EngineConfig (as a dict) to run proof 4 with; None leaves it to the caller."""
        from loop.merge.checkpoint import base_view, open_checkpoint, write_merged
        from loop.merge.layouts import AdapterError, fused_reference_adapter, plan, read_adapter

        started = time.perf_counter()
        base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
        report = MergeReport(str(base_dir), str(adapter_dir), str(out_dir))
        tmp = out_dir.with_name(out_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            ckpt = open_checkpoint(base_dir)
            report.quantized = (ckpt.quant or {}).get("quant_method")
            adapter, view = read_adapter(adapter_dir), base_view(ckpt)
            edits = plan(adapter, view)
            stats = write_merged(ckpt, edits, tmp)
            report.layouts, report.tensors_changed = stats.layouts, stats.tensors_changed
            report.peak_tensor_mb = stats.peak_tensor_mb
            report.merge_seconds = time.perf_counter() - started
            with tempfile.TemporaryDirectory() as scratch:
                # peft cannot put split-module deltas on a fused base: the reference uses the same
                # adapter restated on the fused modules (stacked A, block-diagonal B).
                reference = fused_reference_adapter(adapter, view, Path(scratch) / "adapter") or adapter_dir
                self._prove(report, base_dir, reference, tmp)
                if engine is not None and not report.reasons:
                    engine_proof(report, base_dir, reference, tmp, engine, self.cfg.num_probes)
        except AdapterError as e:
            report.reasons.append(str(e))
        except Exception as e:  # noqa: BLE001 - a merge or proof that cannot run is a failed proof
            report.reasons.append(f"the merge or its proof could not run: {type(e).__name__}: {e}")
        report.passed = not report.reasons
        if report.passed:
            report.merged_digest = dir_digest(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        report.seconds = time.perf_counter() - started
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        (out_dir.parent / "merge_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        if not report.passed:
            raise MergeFailed("; ".join(report.reasons))
        return report

    def _prove(self, report: MergeReport, base_dir: Path, adapter_dir: Path, merged_dir: Path) -> None:
        import torch

        ids, mask = probe_inputs(base_dir, self.cfg.num_probes)
        reference, base = reference_logits(base_dir, adapter_dir, ids, mask)
        merged = _load(merged_dir)
        with torch.no_grad():
            mer = merged(input_ids=ids, attention_mask=mask).logits[mask.bool()]
        ref, bas = reference[mask.bool()], base[mask.bool()]
        report.finite = bool(torch.isfinite(mer).all())
        report.max_abs_logit_diff = float((mer - ref).abs().max())
        lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(mer, -1)
        report.kl_to_reference = float((lp.exp() * (lp - lq)).sum(-1).mean())
        report.merged_to_reference = float((mer - ref).abs().mean())
        report.merged_to_base = float((mer - bas).abs().mean())
        if not report.finite:
            report.reasons.append("merged logits contain NaN or Inf")
        if report.quantized in QUANTIZED:
            if report.kl_to_reference > self.cfg.max_kl_quantized:
                report.reasons.append(f"KL(reference || merged) {report.kl_to_reference:.2e} exceeds "
                                      f"merge.max_kl_quantized {self.cfg.max_kl_quantized:.0e} ({report.quantized} base)")
        elif report.max_abs_logit_diff > self.cfg.max_abs_logit_diff:
            report.reasons.append(f"max |merged - reference| logit {report.max_abs_logit_diff:.2e} exceeds "
                                  f"merge.max_abs_logit_diff {self.cfg.max_abs_logit_diff:.0e}")
        if not report.merged_to_reference < report.merged_to_base:
            report.reasons.append("merged model is not closer to base+adapter than to the base: delta missing")
        report.reasons += consistency(base_dir, merged_dir)


def engine_proof(report: MergeReport, base_dir: Path, adapter_dir: Path, merged_dir: Path, engine: dict,
                 num_probes: int, max_tokens: int = 16) -> None:
    """Proof 4: the serving engine's greedy answers on the merged directory equal peft's on base + adapter."""
    import torch

    from loop.serving.engine import answer_with_engine
    from loop.models.answers import generate_answers

    if not (base_dir / "tokenizer_config.json").exists():
        report.engine_note = "skipped: the base has no tokenizer, so there is nothing to chat with"
        return
    if report.quantized in QUANTIZED and not torch.cuda.is_available():
        report.engine_note = f"skipped: vLLM has no {report.quantized} kernels on CPU"
        return
    questions = PROBES[:num_probes]
    reference = generate_answers(base_dir, questions, max_tokens, str(adapter_dir))
    got = decoded(base_dir, answer_with_engine(str(merged_dir), engine, [[{"role": "user", "content": q}]
                                                                          for q in questions], max_tokens)["token_ids"])
    same = sum(a == b for a, b in zip(got, reference))
    report.engine_identical, report.engine_note = f"{same}/{len(questions)}", "vLLM on the merged directory"
    if same != len(questions):
        first = next(i for i, (a, b) in enumerate(zip(got, reference)) if a != b)
        report.reasons.append(f"the serving engine's greedy answer on the merged model differs from the reference "
                              f"on {len(questions) - same} of {len(questions)} probes (first: {got[first]!r} vs "
                              f"{reference[first]!r})")


def decoded(model_dir, token_ids: list[list[int]]) -> list[str]:
    """Engine output token ids decoded as the Hugging Face reference decodes its own (special tokens
    skipped, a trailing partial UTF-8 character kept), so the texts compare token for token."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir).batch_decode(token_ids, skip_special_tokens=True)


def _load(model_dir: Path):
    """A model in float64 (a quantized checkpoint is dequantized by transformers on load)."""
    import torch
    from transformers import AutoModelForCausalLM

    # transformers' default experts kernel (grouped_mm) has no float64 CPU kernel: experts run eager.
    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                experts_implementation="eager").to(torch.float64).eval()


def reference_logits(base_dir: Path, adapter_dir: Path, ids, mask):
    """Logits of base + adapter through peft (unmerged) and of the base alone, float64."""
    import torch
    from peft import PeftModel

    model = PeftModel.from_pretrained(_load(base_dir), str(adapter_dir)).to(torch.float64).eval()
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        with model.disable_adapter():
            base = model(input_ids=ids, attention_mask=mask).logits
    return reference, base


def probe_inputs(model_dir: Path, n: int):
    """Chat-formatted probe prompts with the model's tokenizer; fixed random token ids where the
    directory has no tokenizer (a bare checkpoint)."""
    import torch

    from loop.models.chat import chat_batch, left_padded_tokenizer

    try:
        tok = left_padded_tokenizer(model_dir)
        if tok.chat_template:
            enc = chat_batch(tok, PROBES[:n])
            return enc["input_ids"], enc["attention_mask"]
    except (OSError, ValueError):
        pass
    vocab = json.loads((model_dir / "config.json").read_text()).get("vocab_size") or 1000
    ids = torch.randint(1, vocab, (n, 16), generator=torch.Generator().manual_seed(0))
    return ids, torch.ones_like(ids)


def consistency(base_dir: Path, merged_dir: Path) -> list[str]:
    """Reasons the merged directory is not the base's shape: tensor names, shapes and dtypes, config
    (bar an untied head), tokenizer files."""
    from safetensors import safe_open

    def tensors(d: Path) -> dict:
        out = {}
        for f in sorted(d.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                for k in h.keys():
                    sl = h.get_slice(k)
                    out[k] = (tuple(sl.get_shape()), sl.get_dtype())
        return out

    reasons = []
    base, merged = tensors(base_dir), tensors(merged_dir)
    added = set(merged) - set(base)
    if set(base) - set(merged) or added - {"lm_head.weight"}:
        reasons.append(f"tensor names differ from the base: missing {sorted(set(base) - set(merged))[:3]}, "
                       f"extra {sorted(added - {'lm_head.weight'})[:3]}")
    changed = [k for k in base if k in merged and base[k] != merged[k]]
    if changed:
        reasons.append(f"shapes or dtypes differ from the base: {changed[:3]}")
    b_cfg, m_cfg = (json.loads((d / "config.json").read_text()) for d in (base_dir, merged_dir))
    if added:
        b_cfg["tie_word_embeddings"] = m_cfg.get("tie_word_embeddings")
        if isinstance(b_cfg.get("text_config"), dict) and isinstance(m_cfg.get("text_config"), dict):
            b_cfg["text_config"]["tie_word_embeddings"] = m_cfg["text_config"].get("tie_word_embeddings")
    if b_cfg != m_cfg:
        reasons.append("config.json differs from the base's")
    for f in base_dir.glob("*token*"):
        if not (merged_dir / f.name).exists() or (merged_dir / f.name).read_bytes() != f.read_bytes():
            reasons.append(f"tokenizer file {f.name} differs from the base's")
    return reasons
