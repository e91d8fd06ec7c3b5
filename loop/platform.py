"""What the hardware can do, decided in one place: whether bfloat16 arithmetic is native here.

Nothing is probed at import time; each answer is read once and kept.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""CPU features that make bfloat16 matrix products native; without them torch emulates bf16 on the
CPU, which measured ~20x slower than fp32 for a LoRA step of the default student (AVX2 EPYC, 2 cores)."""


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((ln for ln in text.splitlines() if ln.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def native_bf16(device_type: str) -> bool:
    """True when bfloat16 autocast is fast on this device: a CUDA GPU that supports it, or a CPU with
    AVX512-BF16 or AMX."""
    if device_type == "cuda":
        import torch

        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return any(f in cpu_flags() for f in BF16_CPU_FLAGS)


def resolve_precision(precision: str, device_type: str) -> str:
    """`auto` becomes `bf16-mixed` where bfloat16 is native, else `fp32`; the others stand."""
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(device_type) else "fp32"
