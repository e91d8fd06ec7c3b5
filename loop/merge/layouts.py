"""Where each delta of a peft LoRA adapter goes in a base checkpoint, resolved before anything is written.

Every adapter module maps to edits of logical base weights (`formats.py`: plain, block FP8 or MXFP4),
or the merge is refused with an error naming the module: a layout is never guessed. With
s = lora_alpha / r (lora_alpha / sqrt(r) with rslora; per-module `rank_pattern` / `alpha_pattern`):

  linear        W[out, in] += s B @ A                      Llama, Qwen, Phi-3's fused modules, per-expert Linear
  dora          W = m / |W + s B @ A|_row * (W + s B @ A)  DoRA (use_dora) on a plain Linear weight
  conv1d        W[in, out] += s (B @ A)^T                  GPT-2 `Conv1D` (c_attn, c_proj, c_fc)
  embedding     E[vocab, dim] += s (B @ A)^T               lora_embedding_A / lora_embedding_B
  fused_rows    rows of W_qkv (q | k | v) or W_gate_up (gate | up) += s B @ A
                                                           an adapter on split q/k/v or gate/up modules,
                                                           a base with Phi-3's fused qkv_proj / gate_up_proj
  untied_head   lm_head = tied embedding + s B @ A         an adapter on the head of a tied-embedding model:
                                                           the merged model gets its own head
  experts_3d    P[e] += s B_e @ A_e for every expert e     peft `target_parameters` on fused 3-D expert
                                                           parameters (A rows expert-major, B columns
                                                           rank-major: peft's ParamWrapper), on a fused
                                                           3-D base tensor (plain or MXFP4)
  experts_split the same deltas, expert by expert, into per-expert 2-D base tensors (transformers 5
                saves Qwen-MoE / OLMoE as experts.{e}.{gate,up,down}_proj, Mixtral as w1 / w3 / w2)
  expert_into_fused  a per-expert adapter (transformers v4 module names) on a fused 3-D base:
                its expert's rows of gate_up_proj (gate | up) or of down_proj
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

PREFIX = "base_model.model."
CONV1D_MODEL_TYPES = {"gpt2"}
CONV1D_MODULES = {"c_attn", "c_proj", "c_fc"}
TRANSPOSED_EXPERTS_MODEL_TYPES = {"gpt_oss"}
"""Models whose 3-D expert parameters are [E, in, out] (peft's `is_transposed`)."""
SPLIT_TO_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
                  "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
EXPERT_NAMES = {"gate_up_proj": [("gate_proj", "up_proj"), ("w1", "w3")], "down_proj": [("down_proj",), ("w2",)]}


class AdapterError(ValueError):
    """The adapter (or the base) cannot be merged; the message names the file, module or field."""


class LayoutError(AdapterError):
    """An adapter module whose place in the base is not one of the known layouts."""


@dataclass
class Edit:
    target: str
    """Logical base weight (see formats.logical_weights) this edit changes, or creates."""
    layout: str
    module: str
    apply: Callable
    """float32 value of `target` -> new float32 value."""
    source: str | None = None
    """For a created target (untied head): the weight whose value it starts from."""


@dataclass
class Adapter:
    path: Path
    config: dict
    tensors: dict

    def scaling(self, key: str, r: int) -> float:
        alpha = _pattern(self.config.get("alpha_pattern") or {}, key, self.config.get("lora_alpha", 8))
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r

    def rank(self, key: str) -> int:
        return int(_pattern(self.config.get("rank_pattern") or {}, key, self.config.get("r", 8)))


def _pattern(patterns: dict, key: str, default):
    """peft's get_pattern_key: the first pattern matching the key's tail wins."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def read_adapter(adapter_dir: str | Path) -> Adapter:
    """The adapter's config and tensors, checked: files present, LoRA only, every value finite."""
    import torch
    from safetensors.torch import load_file

    d = Path(adapter_dir)
    cfg_file, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_file.exists():
        raise AdapterError(f"{d}: no adapter_config.json: not a peft adapter directory")
    if not weights.exists():
        found = "adapter_model.bin (convert it to safetensors)" if (d / "adapter_model.bin").exists() else "no weights"
        raise AdapterError(f"{d}: no adapter_model.safetensors, found {found}")
    config = json.loads(cfg_file.read_text())
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{cfg_file}: peft_type {config.get('peft_type')}: only LoRA adapters are merged")
    tensors = load_file(weights)
    for k, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise AdapterError(f"{weights}: tensor {k} has NaN or Inf values; the training run diverged")
    return Adapter(d, config, tensors)


@dataclass
class Base:
    """What the planner needs to know of a base checkpoint: its config and its logical weights' shapes."""
    config: dict
    shapes: dict = field(default_factory=dict)
    """Logical weight name -> float shape (MXFP4: [..., in, out])."""

    @property
    def model_type(self) -> str:
        return self.config.get("model_type", "")

    def text(self, key: str, default=None):
        """A config value, from the top level or a nested text_config."""
        if key in self.config:
            return self.config[key]
        return (self.config.get("text_config") or {}).get(key, default)


def _modules(adapter: Adapter) -> tuple[dict, dict]:
    """LoRA tensors grouped by module path (prefix stripped), and the full tensors of modules_to_save."""
    modules: dict[str, dict] = {}
    saved = {}
    suffixes = {".lora_A.weight": "A", ".lora_B.weight": "B", ".lora_B.bias": "bias",
                ".lora_embedding_A": "emb_A", ".lora_embedding_B": "emb_B", ".lora_magnitude_vector": "magnitude",
                ".lora_magnitude_vector.weight": "magnitude"}
    for key, t in adapter.tensors.items():
        name = key[len(PREFIX):] if key.startswith(PREFIX) else key
        for suffix, part in suffixes.items():
            if name.endswith(suffix):
                modules.setdefault(name[: -len(suffix)], {})[part] = t
                break
        else:
            if ".lora_" in name:
                raise AdapterError(f"{adapter.path}: tensor {key} is of a LoRA kind this merger does not know")
            saved[name] = t
    for m, parts in modules.items():
        if not ({"A", "B"} <= parts.keys() or {"emb_A", "emb_B"} <= parts.keys()):
            raise AdapterError(f"{adapter.path}: module {m} has {sorted(parts)} but needs both A and B matrices")
    return modules, saved


def plan(adapter: Adapter, base: Base) -> list[Edit]:
    """Every edit the adapter makes to the base, or AdapterError / LayoutError naming what is wrong."""
    modules, saved = _modules(adapter)
    edits: list[Edit] = []
    # Full tensors first (modules_to_save, and the base weights peft saves beside an adapter on an
    # embedding or head as `<module>.base_layer.weight`); LoRA deltas then apply on top of them.
    for key, t in saved.items():
        name = key.replace(".base_layer.", ".")
        if name == "lm_head.weight" and name not in base.shapes and _tied(base) \
                and base.shapes.get(_embedding_weight(base)) == tuple(t.shape):
            continue  # the tied head's weight is the embedding's, which the base holds already
        if base.shapes.get(name) != tuple(t.shape):
            raise AdapterError(f"{adapter.path}: saved tensor {key} {tuple(t.shape)} has no match in the base "
                               f"({name}: {base.shapes.get(name)}): the adapter was made for another base model")
        layout = "saved_base_weight" if ".base_layer." in key else "modules_to_save"
        edits.append(Edit(name, layout, name, lambda w, t=t: t.float().clone()))
    for module, parts in sorted(modules.items()):
        if "emb_A" in parts:
            edits.append(_embedding(adapter, base, module, parts))
        elif parts["A"].dim() == 2 and _is_param_wrapper(adapter, module):
            edits += _experts(adapter, base, module, parts)
        else:
            edits += _linear(adapter, base, module, parts)
    if not edits:
        raise AdapterError(f"{adapter.path}: the adapter has no LoRA tensors")
    return edits


def _check_rank(adapter: Adapter, module: str, key: str, got: int, experts: int = 1) -> int:
    r = adapter.rank(key)
    if got != r * experts:
        raise AdapterError(f"{adapter.path}: module {module} has rank {got // max(experts, 1)} but adapter_config.json "
                           f"says r={r}: the adapter's files do not belong together")
    return r


def _shape_error(adapter: Adapter, module: str, what: str, got, want) -> AdapterError:
    return AdapterError(f"{adapter.path}: module {module}: the delta is {tuple(got)} but the base's {what} is "
                        f"{tuple(want)}: the adapter was made for another base model")


def _embedding(adapter: Adapter, base: Base, module: str, parts: dict) -> Edit:
    a, b = parts["emb_A"], parts["emb_B"]  # [r, vocab], [dim, r]
    target = f"{module}.weight"
    if target not in base.shapes:
        raise LayoutError(f"adapter module {module} (an embedding): the base has no tensor {target}")
    r = _check_rank(adapter, module, module, a.shape[0])
    s = adapter.scaling(module, r)
    if (a.shape[1], b.shape[0]) != base.shapes[target]:
        raise _shape_error(adapter, module, target, (a.shape[1], b.shape[0]), base.shapes[target])
    return Edit(target, "embedding", module, lambda w: w + s * (b.float() @ a.float()).T)


def _linear(adapter: Adapter, base: Base, module: str, parts: dict) -> list[Edit]:
    a, b = parts["A"].float(), parts["B"].float()  # [r, in], [out, r]
    r = _check_rank(adapter, module, module, a.shape[0])
    s = adapter.scaling(module, r)
    out_dim, in_dim = b.shape[0], a.shape[1]
    target = f"{module}.weight"
    leaf = module.rsplit(".", 1)[-1]
    parent = module.rsplit(".", 1)[0] if "." in module else ""
    edits = []
    if target in base.shapes:
        shape = base.shapes[target]
        if base.model_type in CONV1D_MODEL_TYPES and leaf in CONV1D_MODULES:
            if shape != (in_dim, out_dim):
                raise _shape_error(adapter, module, f"{target} (Conv1D, [in, out])", (in_dim, out_dim), shape)
            edits.append(Edit(target, "conv1d", module, lambda w: w + s * (b @ a).T))
        else:
            if shape != (out_dim, in_dim):
                raise _shape_error(adapter, module, target, (out_dim, in_dim), shape)
            if "magnitude" in parts:  # DoRA: each row of W + delta rescaled to its learned magnitude
                m = parts.pop("magnitude").float()

                def dora(w, m=m):
                    merged = w + s * (b @ a)
                    return merged * (m / merged.norm(p=2, dim=1)).unsqueeze(1)

                edits.append(Edit(target, "dora", module, dora))
            else:
                edits.append(Edit(target, "linear", module, lambda w: w + s * (b @ a)))
    elif leaf == "lm_head" and _tied(base):
        embed = _embedding_weight(base)
        if base.shapes[embed] != (out_dim, in_dim):
            raise _shape_error(adapter, module, f"tied head {embed}", (out_dim, in_dim), base.shapes[embed])
        edits.append(Edit(target, "untied_head", module, lambda w: w + s * (b @ a), source=embed))
    elif leaf in SPLIT_TO_FUSED and f"{parent}.{SPLIT_TO_FUSED[leaf][0]}.weight" in base.shapes:
        fused, part = SPLIT_TO_FUSED[leaf]
        target = f"{parent}.{fused}.weight"
        rows = _fused_rows(base, fused, part, base.shapes[target])
        if base.shapes[target][1] != in_dim or rows.stop - rows.start != out_dim:
            raise _shape_error(adapter, module, f"rows {rows.start}:{rows.stop} of {target}", (out_dim, in_dim),
                               (rows.stop - rows.start, base.shapes[target][1]))

        def into_rows(w, rows=rows):
            w = w.clone()
            w[rows] += s * (b @ a)
            return w

        edits.append(Edit(target, "fused_rows", module, into_rows))
    elif (fused := _expert_into_fused(base, module)) is not None:
        target, e, rows = fused

        def into_expert(w, e=e, rows=rows):
            w = w.clone()
            w[e, rows] += s * (b @ a)
            return w

        if base.shapes[target][2] != in_dim or rows.stop - rows.start != out_dim:
            raise _shape_error(adapter, module, f"expert {e} rows {rows.start}:{rows.stop} of {target}",
                               (out_dim, in_dim), (rows.stop - rows.start, base.shapes[target][2]))
        edits.append(Edit(target, "expert_into_fused", module, into_expert))
    else:
        raise LayoutError(f"adapter module {module}: the base has no {target} and no known fused layout holds it "
                          f"(model_type {base.model_type or 'unknown'}); refusing to guess where its delta goes")
    if "magnitude" in parts:
        raise LayoutError(f"adapter module {module}: DoRA is merged on plain Linear weights only, not as "
                          f"{edits[0].layout if edits else 'this layout'}; train without use_dora")
    if "bias" in parts:
        bias = f"{module}.bias"
        if bias not in base.shapes:
            raise LayoutError(f"adapter module {module} has a lora_B bias but the base has no {bias}")
        edits.append(Edit(bias, "lora_bias", module, lambda w: w + s * parts["bias"].float()))
    return edits


def _expert_into_fused(base: Base, module: str):
    """A per-expert adapter module (transformers v4 names: experts.{e}.gate_proj / up_proj / down_proj,
    or Mixtral's w1 / w3 / w2) on a base whose experts are fused 3-D [E, out, in]: (target, e, rows)."""
    m = re.fullmatch(r"(.*\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj|w1|w3|w2)", module)
    if m is None or base.model_type in TRANSPOSED_EXPERTS_MODEL_TYPES:
        return None
    owner, e, leaf = m.group(1), int(m.group(2)), m.group(3)
    owner = owner.replace(".block_sparse_moe.", ".mlp.") if f"{owner}.gate_up_proj" not in base.shapes else owner
    fused = f"{owner}.down_proj" if leaf in ("down_proj", "w2") else f"{owner}.gate_up_proj"
    shape = base.shapes.get(fused)
    if shape is None or len(shape) != 3 or e >= shape[0]:
        return None
    if fused.endswith("down_proj"):
        return fused, e, slice(0, shape[1])
    half = shape[1] // 2  # gate rows first, then up (chunk(2))
    return fused, e, slice(0, half) if leaf in ("gate_proj", "w1") else slice(half, shape[1])


def _tied(base: Base) -> bool:
    return bool(base.text("tie_word_embeddings", True)) and "lm_head.weight" not in base.shapes


def _embedding_weight(base: Base) -> str:
    for name in base.shapes:
        if name.endswith(("embed_tokens.weight", "wte.weight", "word_embeddings.weight")):
            return name
    raise LayoutError("the adapter targets lm_head, which is tied to an input embedding the base does not have")


def _fused_rows(base: Base, fused: str, part: int, shape: tuple) -> slice:
    if fused == "qkv_proj":
        heads = base.text("num_attention_heads")
        kv = base.text("num_key_value_heads", heads)
        head_dim = base.text("head_dim") or base.text("hidden_size") // heads
        sizes = [heads * head_dim, kv * head_dim, kv * head_dim]
    else:
        sizes = [shape[0] // 2, shape[0] // 2]  # gate rows first, then up (Phi-3's chunk(2))
    if sum(sizes) != shape[0]:
        raise LayoutError(f"fused {fused} has {shape[0]} rows but the config's heads give {sizes}")
    start = sum(sizes[:part])
    return slice(start, start + sizes[part])


def _is_param_wrapper(adapter: Adapter, module: str) -> bool:
    targets = adapter.config.get("target_parameters") or []
    owner = re.sub(r"(\.base_layer)+$", "", module)
    return any(f"{owner}.{t.rsplit('.', 1)[-1]}".endswith(t) for t in targets)


def _delta_3d(a, b, experts: int, s: float, transposed: bool):
    """peft ParamWrapper: A [E r, in] rows expert-major, B [out, r E] columns rank-major -> [E, out, in]
    (or [E, in, out] for transposed experts)."""
    r = a.shape[0] // experts
    a3 = a.float().reshape(experts, r, a.shape[-1])
    b3 = b.float().reshape(b.shape[0], r, experts).permute(2, 0, 1)
    d = s * (b3 @ a3)
    return d.transpose(1, 2) if transposed else d


def _experts(adapter: Adapter, base: Base, module: str, parts: dict) -> list[Edit]:
    """A ParamWrapper on an experts module: which of its targeted parameters it is, by shape."""
    owner = re.sub(r"(\.base_layer)+$", "", module)
    transposed = base.model_type in TRANSPOSED_EXPERTS_MODEL_TYPES
    leaves = [t.rsplit(".", 1)[-1] for t in adapter.config.get("target_parameters") or []
              if f"{owner}.{t.rsplit('.', 1)[-1]}".endswith(t)]
    tried = []
    for leaf in leaves:
        layout = _expert_storage(base, owner, leaf)
        if layout is None:
            continue
        experts, param_shape, edits_for = layout
        if parts["A"].shape[0] % experts:
            continue
        key = f"{owner}.{leaf}"
        r = adapter.rank(key)
        d_shape = (experts, *((parts["A"].shape[1], parts["B"].shape[0]) if transposed
                              else (parts["B"].shape[0], parts["A"].shape[1])))
        tried.append(f"{leaf} {param_shape}")
        if d_shape != param_shape:
            continue
        _check_rank(adapter, module, key, parts["A"].shape[0], experts)
        s = adapter.scaling(key, r)
        delta = lambda a=parts["A"], b=parts["B"]: _delta_3d(a, b, experts, s, transposed)  # noqa: E731
        return edits_for(module, delta)
    raise LayoutError(f"adapter module {module} (peft target_parameters on {owner}): no targeted parameter of the "
                      f"base matches its delta (tried {tried or leaves}); refusing to guess")


def _expert_storage(base: Base, owner: str, leaf: str):
    """(experts, parameter-layout shape, edits builder) for one fused expert parameter, stored fused
    (3-D, plain or MXFP4) or per expert (2-D); None when the base holds neither."""
    fused = f"{owner}.{leaf}"
    if fused in base.shapes and len(base.shapes[fused]) == 3:
        shape = base.shapes[fused]
        return shape[0], shape, lambda module, delta: [Edit(fused, "experts_3d", module, lambda w: w + delta())]
    for names in EXPERT_NAMES.get(leaf, []):
        for prefix in (owner, owner.replace(".mlp.experts", ".block_sparse_moe.experts")):
            n = 0
            while f"{prefix}.{n}.{names[0]}.weight" in base.shapes:
                n += 1
            if not n:
                continue
            rows = [base.shapes[f"{prefix}.0.{nm}.weight"] for nm in names]
            shape = (n, sum(r[0] for r in rows), rows[0][1])
            return n, shape, _split_builder(prefix, names, [r[0] for r in rows], n)
    return None


def _split_builder(prefix: str, names: tuple, sizes: list[int], experts: int):
    def build(module, delta):
        cache = {}

        def part(e, i):
            if "d" not in cache:
                cache["d"] = delta()
            start = sum(sizes[:i])
            return cache["d"][e, start:start + sizes[i]]

        return [Edit(f"{prefix}.{e}.{nm}.weight", "experts_split", module, lambda w, e=e, i=i: w + part(e, i))
                for e in range(experts) for i, nm in enumerate(names)]
    return build


def fused_reference_adapter(adapter: Adapter, base: Base, out_dir: Path) -> Path | None:
    """An adapter peft can apply to a fused-module base, equal to `adapter` (which targets split
    q/k/v or gate/up modules), for the unmerged reference: per fused module, A is the parts' A
    stacked (rank = sum of ranks), B is block-diagonal with zero rows for parts not targeted, and
    the alpha keeps each part's scaling. None when no module needs it."""
    import torch
    from safetensors.torch import save_file

    modules, _ = _modules(adapter)
    groups: dict[str, dict[int, tuple[str, dict]]] = {}
    for module, parts in modules.items():
        leaf, parent = module.rsplit(".", 1)[-1], module.rsplit(".", 1)[0]
        if "A" in parts and f"{module}.weight" not in base.shapes and leaf in SPLIT_TO_FUSED \
                and f"{parent}.{SPLIT_TO_FUSED[leaf][0]}.weight" in base.shapes:
            groups.setdefault(f"{parent}.{SPLIT_TO_FUSED[leaf][0]}", {})[SPLIT_TO_FUSED[leaf][1]] = (module, parts)
    if not groups:
        return None
    tensors = {k: v for k, v in adapter.tensors.items()
               if not any(k.removeprefix(PREFIX).startswith(m + ".") for g in groups.values() for m, _ in g.values())}
    config = json.loads(json.dumps(adapter.config))
    rank_pattern, alpha_pattern = dict(config.get("rank_pattern") or {}), dict(config.get("alpha_pattern") or {})
    for fused, parts in groups.items():
        leaf = fused.rsplit(".", 1)[-1]
        shape = base.shapes[f"{fused}.weight"]
        a_blocks, b_blocks = [], []
        for i, (module, p) in sorted(parts.items()):
            scale = adapter.scaling(module, adapter.rank(module))
            a_blocks.append(p["A"].float() * scale)  # each part's scaling folded in; the fused scaling is 1
            block = torch.zeros(shape[0], p["A"].shape[0])  # B's columns of this part, zero outside its rows
            block[_fused_rows(base, leaf, i, shape)] = p["B"].float()
            b_blocks.append(block)
        rank = sum(a.shape[0] for a in a_blocks)
        tensors[f"{PREFIX}{fused}.lora_A.weight"] = torch.cat(a_blocks).contiguous()
        tensors[f"{PREFIX}{fused}.lora_B.weight"] = torch.cat(b_blocks, dim=1).contiguous()
        key = re.escape(fused)
        rank_pattern[key] = rank
        alpha_pattern[key] = math.sqrt(rank) if config.get("use_rslora") else rank
    fused_leaves = sorted({f.rsplit(".", 1)[-1] for f in groups})
    targets = config.get("target_modules") or []
    if isinstance(targets, str):  # a regex peft full-matches (or "all-linear", which takes them anyway)
        targets = targets if targets == "all-linear" else rf"({targets})|(.*\.({'|'.join(fused_leaves)}))"
    else:
        targets = sorted(set(targets) | set(fused_leaves))
    config.update(rank_pattern=rank_pattern, alpha_pattern=alpha_pattern, target_modules=targets)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "adapter_config.json").write_text(json.dumps(config, indent=2))
    save_file(tensors, str(out_dir / "adapter_model.safetensors"))
    return out_dir
