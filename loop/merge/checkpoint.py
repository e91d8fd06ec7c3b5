"""Stream a base checkpoint through a list of edits, shard by shard, tensor by tensor.

Peak memory is about one output shard plus the tensors of one logical weight: no second copy of the
model. The output keeps the base's shard names, tensor names, dtypes and formats (a quantized
weight is dequantized, edited and requantized with fresh scales); non-weight files are copied.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from loop.merge.formats import Stored, logical_weights, read_float, write_like
from loop.merge.layouts import AdapterError, Base, Edit

INDEX = "model.safetensors.index.json"


@dataclass
class Checkpoint:
    path: Path
    config: dict
    shards: list[str]
    key_shard: dict[str, str]
    logical: dict[str, Stored] = field(default_factory=dict)

    @property
    def quant(self) -> dict | None:
        return self.config.get("quantization_config")


def open_checkpoint(base_dir: str | Path) -> Checkpoint:
    """The base's config, shards and logical weights; AdapterError when files are missing."""
    from safetensors import safe_open

    d = Path(base_dir)
    if not (d / "config.json").exists():
        raise AdapterError(f"{d}: no config.json: not a Hugging Face model directory")
    config = json.loads((d / "config.json").read_text())
    if (d / INDEX).exists():
        key_shard = json.loads((d / INDEX).read_text())["weight_map"]
        shards = sorted(set(key_shard.values()))
        missing = [s for s in shards if not (d / s).exists()]
        if missing:
            raise AdapterError(f"{d}: {INDEX} lists shards that are missing: {', '.join(missing)}")
    elif (d / "model.safetensors").exists():
        shards = ["model.safetensors"]
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            key_shard = {k: "model.safetensors" for k in f.keys()}
    else:
        raise AdapterError(f"{d}: no model.safetensors or {INDEX}: the base must be in safetensors")
    ckpt = Checkpoint(d, config, shards, key_shard)
    ckpt.logical = logical_weights(list(key_shard), ckpt.quant)
    return ckpt


def base_view(ckpt: Checkpoint) -> Base:
    """Shapes of the logical weights, read from the shard headers (no tensor is loaded)."""
    from safetensors import safe_open

    shapes = {}
    by_shard: dict[str, list[Stored]] = {}
    for st in ckpt.logical.values():
        by_shard.setdefault(ckpt.key_shard[st.keys[0]], []).append(st)
    for shard, stored in by_shard.items():
        with safe_open(str(ckpt.path / shard), "pt") as f:
            for st in stored:
                shape = tuple(f.get_slice(st.keys[0]).get_shape())
                if st.format == "mxfp4":  # [..., out, G, 16] -> [..., in, out]
                    shape = (*shape[:-3], shape[-2] * 32, shape[-3])
                shapes[st.name] = shape
    return Base(ckpt.config, shapes)


@dataclass
class WriteStats:
    tensors_changed: int = 0
    layouts: dict = field(default_factory=dict)
    peak_tensor_mb: float = 0.0
    """The most tensor bytes held at once while writing (one output shard plus one weight's inputs)."""


def write_merged(ckpt: Checkpoint, edits: list[Edit], out_dir: Path) -> WriteStats:
    """Write base + edits to `out_dir` (which must not exist), shard by shard."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    by_target: dict[str, list[Edit]] = {}
    for e in edits:
        by_target.setdefault(e.target, []).append(e)
    created = {t: es for t, es in by_target.items() if t not in ckpt.logical}
    stats = WriteStats()
    for e in edits:
        stats.layouts[e.layout] = stats.layouts.get(e.layout, 0) + 1
    out_dir.mkdir(parents=True)
    handles: dict[str, object] = {}

    def tensor(key: str):
        shard = ckpt.key_shard[key]
        if shard not in handles:
            handles[shard] = safe_open(str(ckpt.path / shard), "pt")
        return handles[shard].get_tensor(key)

    pending: dict[str, object] = {}  # outputs whose key lives in a later shard
    done: set[str] = set()
    new_keys: dict[str, str] = {}
    for shard in ckpt.shards:
        out: dict = {}
        held = 0
        for key in [k for k, s in ckpt.key_shard.items() if s == shard]:
            if key in done:
                continue
            if key in pending:
                out[key] = pending.pop(key)
                done.add(key)
                continue
            stored = _owner(ckpt, key)
            inputs = {k: tensor(k) for k in stored.keys}
            held_now = sum(t.numel() * t.element_size() for t in inputs.values())
            if stored.name in by_target:
                value = read_float(stored, inputs, ckpt.quant)
                for e in by_target[stored.name]:
                    value = e.apply(value)
                results = write_like(stored, value, inputs, ckpt.quant)
                stats.tensors_changed += 1
            else:
                results = inputs
            for k, t in results.items():
                if ckpt.key_shard[k] == shard:
                    out[k] = t
                    held += t.numel() * t.element_size()
                else:
                    pending[k] = t
                done.add(k)
            for target, es in list(created.items()):
                if es[0].source == stored.name:  # an untied head starts from the embedding just read
                    value = read_float(stored, inputs, ckpt.quant)
                    for e in es:
                        value = e.apply(value)
                    out[target] = value.to(inputs[stored.keys[0]].dtype).contiguous()
                    new_keys[target] = shard
                    stats.tensors_changed += 1
                    del created[target]
            stats.peak_tensor_mb = max(stats.peak_tensor_mb, (held + held_now) / 2**20)
        save_file(out, str(out_dir / shard), metadata={"format": "pt"})
        del out
        handles.pop(shard, None)  # its pages leave the process's resident set once it is written
    if created:
        raise AdapterError(f"edits to {sorted(created)} found no source weight in the base")
    for f in ckpt.path.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (INDEX, "config.json"):
            shutil.copy2(f, out_dir / f.name)
    config = dict(ckpt.config)
    if new_keys:  # a head of its own now: no longer tied to the input embedding
        config["tie_word_embeddings"] = False
        if isinstance(config.get("text_config"), dict):
            config["text_config"] = {**config["text_config"], "tie_word_embeddings": False}
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    if (ckpt.path / INDEX).exists():  # a single-file base gets its new keys in that file, no index
        index = json.loads((ckpt.path / INDEX).read_text())
        index["weight_map"] = {**ckpt.key_shard, **new_keys}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2))
    return stats


def _owner(ckpt: Checkpoint, key: str) -> Stored:
    for name in (key, key[:-7] if key.endswith(("_blocks", "_scales")) else None,
                 key[: -len("_scale_inv")] if key.endswith("_scale_inv") else None):
        if name and name in ckpt.logical and key in ckpt.logical[name].keys:
            return ckpt.logical[name]
    raise AdapterError(f"{ckpt.path}: tensor {key} belongs to no weight")
