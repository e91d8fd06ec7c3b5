"""Merge a LoRA adapter into its base and prove the merge: logits equal, delta present, all finite.

This first merger handles what peft's `merge_and_unload` handles for Llama-family models (separate
q/k/v projections, tied embeddings untouched); architecture-specific layouts and quantized bases
come with the merge issue. Any failed proof raises `MergeFailed`; nothing is written on failure.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from loop.config import MergeConfig
from loop.models.digest import dir_digest

PROBES = ["What is the price of the product?", "Who owns the service?", "Tell me something useful.",
          "What is the capital of France?", "Where is it made?", "Which version is current?"]


class MergeFailed(RuntimeError):
    pass


@dataclass
class MergeReport:
    base_dir: str
    adapter_dir: str
    merged_dir: str
    max_abs_logit_diff: float
    """Merged model vs the unmerged peft reference, on the probe prompts."""
    merged_to_reference: float
    merged_to_base: float
    """Mean |logit| distance to the reference and to the plain base: the delta must be present."""
    finite: bool
    merged_digest: str = ""
    seconds: float = 0.0
    passed: bool = False
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


class Merger:
    def __init__(self, cfg: MergeConfig):
        self.cfg = cfg

    def run(self, base_dir: Path, adapter_dir: Path, out_dir: Path) -> MergeReport:
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from loop.models.chat import chat_batch, left_padded_tokenizer

        started = time.perf_counter()
        tok = left_padded_tokenizer(base_dir)
        batch = chat_batch(tok, PROBES[: self.cfg.num_probes])
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                          str(adapter_dir))
        model.eval()
        with torch.no_grad():
            reference = model(**batch).logits
            with model.disable_adapter():
                base = model(**batch).logits
            merged_model = model.merge_and_unload(safe_merge=True)
            merged = merged_model(**batch).logits
        mask = batch["attention_mask"].bool()
        ref, bas, mer = reference[mask], base[mask], merged[mask]
        report = MergeReport(
            base_dir=str(base_dir), adapter_dir=str(adapter_dir), merged_dir=str(out_dir),
            max_abs_logit_diff=float((mer - ref).abs().max()),
            merged_to_reference=float((mer - ref).abs().mean()), merged_to_base=float((mer - bas).abs().mean()),
            finite=bool(torch.isfinite(mer).all()))
        if not report.finite:
            report.reasons.append("merged logits contain NaN or Inf")
        if report.max_abs_logit_diff > self.cfg.max_abs_logit_diff:
            report.reasons.append(f"max |merged - reference| logit {report.max_abs_logit_diff:.2e} exceeds "
                                  f"merge.max_abs_logit_diff {self.cfg.max_abs_logit_diff:.0e}")
        if not report.merged_to_reference < report.merged_to_base:
            report.reasons.append("merged model is not closer to base+adapter than to the base: delta missing")
        report.passed = not report.reasons
        if report.passed:
            tmp = out_dir.with_name(out_dir.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            merged_model.save_pretrained(tmp)
            tok.padding_side = "right"
            tok.save_pretrained(tmp)
            report.merged_digest = dir_digest(tmp)
            shutil.rmtree(out_dir, ignore_errors=True)
            tmp.rename(out_dir)
        report.seconds = time.perf_counter() - started
        (out_dir.parent / "merge_report.json").write_text(json.dumps(report.to_dict(), indent=2))
        if not report.passed:
            raise MergeFailed("; ".join(report.reasons))
        return report
