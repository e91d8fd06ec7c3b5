"""vLLM's CPU LoRA ops, as the engine runs them here: a token without an adapter (slot index -1) gets
no LoRA delta, a token with one gets its own slot's (loop/serving/vllm_lora_rows.py)."""
from importlib.metadata import entry_points

import pytest
import torch

lora_ops = pytest.importorskip("vllm.lora.ops.torch_ops.lora_ops")

from loop.serving.vllm_lora_rows import applies_last_slot, no_lora_rows_untouched, register  # noqa: E402

SLOTS, RANK, HIDDEN, OUT = 4, 8, 16, 12


def _lora_delta(shrink, expand, x, a, b, indices):
    """The LoRA part of a linear layer as punica computes it: shrink to rank, then add the expand."""
    buffer = torch.zeros(x.shape[0], RANK)
    shrink(x, a, buffer, indices, 1.0)
    y = torch.zeros(x.shape[0], OUT)
    expand(buffer, b, y, indices, True)
    return y


def test_rows_without_an_adapter_get_no_delta_and_the_others_their_own_slot():
    torch.manual_seed(0)
    a, b = torch.randn(SLOTS, 1, RANK, HIDDEN), torch.randn(SLOTS, 1, OUT, RANK)  # every slot filled
    x, indices = torch.randn(6, HIDDEN), torch.tensor([-1, 0, 3, -1, 2, -1])
    shrink, expand = (no_lora_rows_untouched(op) for op in (lora_ops.bgmv_shrink, lora_ops.bgmv_expand))
    delta = _lora_delta(shrink, expand, x, a, b, indices)
    assert delta[indices < 0].abs().max().item() == 0.0
    for row in (1, 2, 4):
        slot = int(indices[row])
        own = (b[slot, 0] @ (a[slot, 0] @ x[row]))
        torch.testing.assert_close(delta[row], own, rtol=1e-5, atol=1e-5)
    # the installed ops alone (what an engine runs without the plugin), where they have the defect:
    # a row without an adapter gets the last slot's
    raw_shrink, raw_expand = (getattr(op, "__wrapped__", op) for op in (lora_ops.bgmv_shrink, lora_ops.bgmv_expand))
    if applies_last_slot(raw_shrink):
        raw = _lora_delta(raw_shrink, raw_expand, x, a, b, indices)
        torch.testing.assert_close(raw[0], b[3, 0] @ (a[3, 0] @ x[0]), rtol=1e-5, atol=1e-5)

def test_expand_slice_leaves_rows_without_an_adapter_alone():
    torch.manual_seed(1)
    b = torch.randn(SLOTS, 1, 5, RANK)
    buffer, indices = torch.randn(3, RANK), torch.tensor([-1, 1, -1])
    y = torch.ones(3, OUT)
    no_lora_rows_untouched(lora_ops.bgmv_expand_slice)(buffer, b, y, indices, 4, 5, True)
    assert torch.equal(y[0], torch.ones(OUT)) and torch.equal(y[2], torch.ones(OUT))
    torch.testing.assert_close(y[1, 4:9], 1 + b[1, 0] @ buffer[1], rtol=1e-5, atol=1e-5)


def test_the_plugin_is_installed_for_vllm_and_mends_the_ops_every_engine_process_uses():
    plugins = {p.name: p.value for p in entry_points(group="vllm.general_plugins")}
    assert plugins.get("loop_no_lora_rows") == "loop.serving.vllm_lora_rows:register", plugins
    register()
    register()  # vLLM may load a plugin more than once in one process
    from vllm.lora.punica_wrapper import punica_cpu

    for op in (lora_ops.bgmv_shrink, punica_cpu.bgmv_shrink):
        assert not applies_last_slot(op)
    inner = getattr(punica_cpu.bgmv_shrink, "__wrapped__", None)
    assert inner is None or not hasattr(inner, "__wrapped__"), "wrapped once, not once per load"
