"""Merge benchmark: the streaming merger against peft's merge_and_unload, layout by layout and on the student.

Per layout (benchmarks/zoo.py, built here bigger than the tests' and sharded, so streaming matters)
with zoo's random-nonzero adapter:
  - ours: `layouts.plan` + `checkpoint.write_merged`, disk to disk, without the proofs -> merge_seconds;
  - peft: load the base from disk, PeftModel.from_pretrained, merge_and_unload, save_pretrained -> peft_seconds;
    speed_ratio = peft_seconds / merge_seconds (target >= 1.0), null where peft has no like-for-like merge
    (peft_note says why);
  - each side in a fresh process, page cache warm, best of REPEATS runs; on the first, peak_mem_mb is the
    peak RSS added over the RSS after imports (mmapped input shards count in it) and peak_anon_mb the
    sampled peak of anonymous memory (what the merge allocates);
  - `Merger.run` with its proofs -> proofs_passed, max_abs_logit_diff, kl_to_reference, merge_and_prove_seconds.
Then the config's student with an adapter shaped as the loop trains it (cfg.training: rank, alpha, targets).
Last, `gated_path`: the student with an adapter trained as a first cycle trains it (benchmarks/common.py,
cached), from adapter to validated merged model, stage by stage (merge, proofs, the draft's acceptance,
the gate, serving parity on the merged vLLM engine with the draft).
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from loop.config import LoopConfig

# ~50-60M parameters for the plain layouts (float32, ~200-240 MB in 64 MB shards); MoE and quantized smaller.
# FP8 dimensions are multiples of 128 (transformers' FP8 loader, the proofs' reference, reads those exactly).
PLAIN = dict(vocab_size=16384, hidden_size=640, intermediate_size=1792, num_hidden_layers=8, num_attention_heads=10,
             num_key_value_heads=5, max_position_embeddings=256)
BUILDS = {
    "llama": (PLAIN, "64MB"),
    "phi3_fused": (PLAIN, "64MB"),
    "gpt2_conv1d": (dict(vocab_size=16384, n_embd=640, n_layer=10, n_head=10, n_positions=256), "64MB"),
    "moe_experts": (dict(vocab_size=8192, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         num_experts=16, num_experts_per_tok=2, max_position_embeddings=256,
                         initializer_range=0.02), "16MB"),
    "fp8_block": (dict(vocab_size=16384, hidden_size=512, intermediate_size=1536, num_hidden_layers=6,
                       num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256), "24MB"),
    "mxfp4": (dict(vocab_size=8192, hidden_size=256, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=64, num_local_experts=8, num_experts_per_tok=2,
                   layer_types=["sliding_attention", "full_attention"] * 2, max_position_embeddings=256), "8MB"),
}
REPEATS = 5
PEFT_NOTES = {
    "fp8_block": "no like-for-like baseline: on CPU transformers loads a block-FP8 checkpoint dequantized (no FP8 "
                 "kernels), so peft merges into float weights and save_pretrained writes a float checkpoint without "
                 "the base's quantization_config, not block-FP8 with fresh scales",
    "mxfp4": "no like-for-like baseline: on CPU transformers dequantizes MXFP4 experts to bf16 on load (no kernels), "
             "so peft's merge_and_unload would write bf16 experts, not MXFP4 blocks and scales",
}


def _status_mb(field: str) -> float:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


def _reset_peak() -> float:
    """Reset this process's peak RSS to its current RSS (Linux clear_refs 5); returns the RSS in MB.

    Not resource.getrusage's ru_maxrss: in a child started by exec it already holds the parent's
    peak (the kernel keeps the pre-exec memory's high-water mark), so it would report this benchmark's
    own size. /proc/self/status VmHWM is the child's own, and clear_refs drops what imports peaked at."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then VmHWM also counts the import peak: the figure is an upper bound
    return _status_mb("VmRSS")


class _AnonPeak(threading.Thread):
    """Samples RssAnon every millisecond: a lower bound on the peak of anonymous memory."""

    def __init__(self):
        super().__init__(daemon=True)
        self.before = self.peak = _status_mb("RssAnon")
        self.done = threading.Event()

    def run(self):
        while not self.done.wait(0.001):
            self.peak = max(self.peak, _status_mb("RssAnon"))


def _measure(side: str, base: str, adapter: str, out: str, max_shard_size: str | None, threads: int) -> dict:
    """In a fresh process: REPEATS merges, disk to disk, by `side` (ours | peft); the best seconds, and
    the peak memory the first one added."""
    import torch

    torch.set_num_threads(threads)
    if side == "ours":
        from loop.merge.checkpoint import base_view, open_checkpoint, write_merged
        from loop.merge.layouts import plan, read_adapter
    else:
        from peft import PeftModel
        from safetensors import safe_open
        from transformers import AutoConfig, AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(base))]  # the modeling module, imported now
    result: dict = {"seconds": []}
    for i in range(REPEATS):
        target = Path(out) / f"run{i}"
        if i == 0:
            rss, anon = _reset_peak(), _AnonPeak()
            anon.start()
        started = time.perf_counter()
        if side == "ours":
            ckpt = open_checkpoint(base)
            write_merged(ckpt, plan(read_adapter(adapter), base_view(ckpt)), target)
            seconds = time.perf_counter() - started
        else:
            model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype="auto"), adapter)
            seconds = time.perf_counter() - started
            # peft loads what matches by module name and drops the rest without an error: count what it took.
            with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
                result["adapter_modules"] = sum(".lora_A." in k for k in f.keys())
            result["peft_modules_loaded"] = sum(".lora_A." in k for k in model.state_dict())
            started = time.perf_counter()
            model.merge_and_unload().save_pretrained(target, **({"max_shard_size": max_shard_size}
                                                                 if max_shard_size else {}))
            seconds += time.perf_counter() - started
            del model
        if i == 0:
            anon.done.set()
            anon.join()
            result.update(peak_mem_mb=_status_mb("VmHWM") - rss, peak_anon_mb=anon.peak - anon.before)
        result["seconds"].append(seconds)
        shutil.rmtree(target)
    return {**result, "seconds": min(result["seconds"]), "all_seconds": result["seconds"]}


def _in_fresh_process(*args) -> dict:
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, args)


def _prove(cfg: LoopConfig, base: Path, adapter: Path, out: Path) -> dict:
    """Merger.run with its proofs; a refused merge is reported with its reasons, not raised."""
    from loop.merge.merger import MergeFailed, Merger

    try:
        r = Merger(cfg.merge).run(base, adapter, out).to_dict()
    except MergeFailed:
        r = json.loads((out.parent / "merge_report.json").read_text())
    return {"proofs_passed": r["passed"], "max_abs_logit_diff": r["max_abs_logit_diff"],
            "kl_to_reference": r["kl_to_reference"], "merged_to_reference": r["merged_to_reference"],
            "merged_to_base": r["merged_to_base"], "reasons": r["reasons"], "edits": r["layouts"],
            "peak_tensor_mb": r["peak_tensor_mb"], "write_seconds": r["merge_seconds"], "seconds": r["seconds"]}


def _checkpoint_facts(base: Path) -> dict:
    from loop.merge.checkpoint import base_view, open_checkpoint

    ckpt = open_checkpoint(base)
    params = sum(_numel(s) for s in base_view(ckpt).shapes.values())
    return {"parameters": params, "shards": len(ckpt.shards),
            "checkpoint_mb": sum((base / s).stat().st_size for s in ckpt.shards) / 2**20}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _compare(ours: dict, peft: dict | None, note: str | None) -> dict:
    out = {"merge_seconds": ours["seconds"], "peft_seconds": None, "speed_ratio": None, "peft_note": note,
           "peak_mem_mb": ours["peak_mem_mb"], "peft_peak_mem_mb": None,
           "peak_anon_mb": ours["peak_anon_mb"], "peft_peak_anon_mb": None}
    if peft is None:
        return out
    if peft["peft_modules_loaded"] < peft["adapter_modules"]:
        out["peft_note"] = (f"peft cannot merge this adapter: it loaded {peft['peft_modules_loaded']} of the adapter's "
                            f"{peft['adapter_modules']} LoRA modules without an error (the split q/k/v and gate/up "
                            f"modules have no match in the fused base) and its merge, {peft['seconds']:.1f} s, "
                            "leaves their deltas out")
        return out
    out.update(peft_seconds=peft["seconds"], speed_ratio=peft["seconds"] / ours["seconds"],
               peft_peak_mem_mb=peft["peak_mem_mb"], peft_peak_anon_mb=peft["peak_anon_mb"])
    return out


def _warm(*dirs: Path) -> None:
    """Read every file once so both sides start with the checkpoint in the page cache."""
    for d in dirs:
        for f in d.iterdir():
            with f.open("rb") as h:
                while h.read(1 << 24):
                    pass


def _both_sides(base: Path, adapter: Path, tmp: Path, shard: str | None, threads: int, peft: bool) -> tuple:
    _warm(base, adapter)
    ours = _in_fresh_process("ours", str(base), str(adapter), str(tmp / "ours"), shard, threads)
    theirs = _in_fresh_process("peft", str(base), str(adapter), str(tmp / "peft"), shard, threads) if peft else None
    return ours, theirs


def _layout(cfg: LoopConfig, name: str, tmp: Path, threads: int) -> dict:
    from benchmarks import zoo

    dims, shard = BUILDS[name]
    base = getattr(zoo, name)(tmp / "base", max_shard_size=shard, **dims)
    adapter = zoo.adapter(name, base, tmp / "adapter")
    ours, peft = _both_sides(base, adapter, tmp, shard, threads, peft=name not in PEFT_NOTES)
    proof = _prove(cfg, base, adapter, tmp / "proved" / "merged")
    return {**_checkpoint_facts(base), "adapter_targets": zoo.ADAPTER_TARGETS[name][:2],
            "proofs_passed": proof["proofs_passed"], "max_abs_logit_diff": proof["max_abs_logit_diff"],
            "kl_to_reference": proof["kl_to_reference"], **_compare(ours, peft, PEFT_NOTES.get(name)),
            "merge_and_prove_seconds": proof["seconds"], "all_merge_seconds": ours["all_seconds"],
            "all_peft_seconds": peft and peft["all_seconds"],
            **{k: proof[k] for k in ("merged_to_reference", "merged_to_base", "reasons", "edits", "peak_tensor_mb")}}


def _student(cfg: LoopConfig, tmp: Path, threads: int) -> dict:
    from transformers import AutoConfig

    from benchmarks import zoo

    student = cfg.model_path(cfg.student)
    t = cfg.training
    adapter = zoo.lora_adapter(AutoConfig.from_pretrained(student), tmp / "adapter", t.target_modules,
                               r=t.lora_rank, lora_alpha=t.lora_alpha, lora_dropout=t.lora_dropout)
    ours, peft = _both_sides(student, adapter, tmp, None, threads, peft=True)
    proof = _prove(cfg, student, adapter, tmp / "proved" / "merged")
    return {"model": cfg.student.name, **_checkpoint_facts(student), "lora_rank": t.lora_rank,
            "lora_alpha": t.lora_alpha, "target_modules": t.target_modules,
            "passed": proof["proofs_passed"], "max_abs_logit_diff": proof["max_abs_logit_diff"],
            "kl_to_reference": proof["kl_to_reference"], "write_seconds": proof["write_seconds"],
            "prove_seconds": proof["seconds"] - proof["write_seconds"], **_compare(ours, peft, None),
            "all_merge_seconds": ours["all_seconds"], "all_peft_seconds": peft["all_seconds"],
            **{k: proof[k] for k in ("merged_to_reference", "merged_to_base", "reasons", "edits", "peak_tensor_mb")}}


def _gated(cfg: LoopConfig, tmp: Path) -> dict:
    import ray

    from benchmarks.common import gated_path, trained_adapter

    ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, ignore_reinit_error=True)
    try:
        adapter, train_s = trained_adapter(cfg)
        return {"model": cfg.student.name, "adapter_trained_s": train_s, **gated_path(cfg, adapter, tmp)}
    finally:
        ray.shutdown()


def run(cfg: LoopConfig) -> dict:
    import torch

    from benchmarks import zoo
    from loop.models.fetch import read_manifest

    read_manifest(cfg.model_path(cfg.student))  # before the layouts: a clear error if the student was not fetched
    threads = cfg.training.torch_threads or 2
    torch.set_num_threads(threads)
    steps = [*zoo.LAYOUTS, "student", "gated_path"]
    out: dict = {"layouts": {}, "threads": threads, "repeats": REPEATS}
    cfg.storage.path().mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.storage.path(), prefix="bench-merge-") as tmp:
        for i, name in enumerate(steps, 1):
            print(f"[bench] {i}/{len(steps)} {name}", flush=True)
            t, d = time.perf_counter(), Path(tmp) / name
            if name == "gated_path":
                out[name] = _gated(cfg, d)
                continue
            result = _student(cfg, d, threads) if name == "student" else _layout(cfg, name, d, threads)
            result["step_seconds"] = time.perf_counter() - t
            if name == "student":
                out["student"] = result
            else:
                out["layouts"][name] = result
            shutil.rmtree(d, ignore_errors=True)
    every = [*out["layouts"].values(), out["student"]]
    ratios = [v["speed_ratio"] for v in every if v["speed_ratio"] is not None]
    out["all_proofs_passed"] = all(v["proofs_passed"] for v in out["layouts"].values()) and out["student"]["passed"]
    out["min_speed_ratio"] = min(ratios) if ratios else None
    out["gated_total_s"] = out["gated_path"]["total_s"]
    out["targets"] = {"speed_ratio": ">= 1.0 where peft can merge at all", "proofs_passed": "true on every layout"}
    out["method"] = {
        "merge_seconds": "layouts.plan + checkpoint.write_merged: base and adapter read from disk, merged shards "
                         "written (to the page cache: no fsync on either side), no proofs; fresh spawned process, "
                         f"imports excluded, page cache warm, best of {REPEATS} (all_merge_seconds)",
        "peft_seconds": "AutoModelForCausalLM.from_pretrained(base, dtype='auto') + PeftModel.from_pretrained + "
                        "merge_and_unload + save_pretrained (same max_shard_size); same conditions",
        "speed_ratio": "peft_seconds / merge_seconds (the student's too: both fresh-process figures)",
        "peak_mem_mb": "first run of each side: /proc/self/status VmHWM minus VmRSS after imports, the peak reset "
                       "with clear_refs 5. Not resource.getrusage ru_maxrss: in a spawned child it starts at the "
                       "parent's peak. RSS counts the mmapped pages of the input shards safetensors reads",
        "peak_anon_mb": "first run: RssAnon sampled every 1 ms minus RssAnon after imports (memory allocated, "
                        "without mmapped file pages); a sampled lower bound",
        "merge_and_prove_seconds": "Merger(cfg.merge).run in this process: the merge, float64 proofs, digest, report",
        "student": "write_seconds / prove_seconds: MergeReport.merge_seconds of Merger.run and the rest of its run; "
                   "adapter as the loop trains it (cfg.training lora_rank, lora_alpha, target_modules), A and B random",
        "gated_path": "benchmarks/common.py gated_path, in this process (the engine in a Ray task; its start is in "
                      "serving_parity_s): an adapter trained on the world at epoch 1 (adapter_trained_s when trained "
                      "this run, null when cached), champion = the base student, the config's initial draft",
    }
    return out
