"""The one place that chooses an accelerator. Nothing else in the project calls ``.cuda()``."""

from __future__ import annotations

import functools
import sys

import torch

from .errors import DeviceError, UsageError

_KINDS = ("auto", "cuda", "mps", "cpu")


def pick_device(preference: str = "auto", local_rank: int = 0) -> torch.device:
    """Choose the compute device.

    Args:
        preference: "auto" (cuda, then mps, then cpu), or one of "cuda", "mps", "cpu".
        local_rank: GPU index on this node for distributed runs.
    Returns:
        torch.device; an explicit request that cannot be met is an error, never a silent fallback.
    """
    if preference not in _KINDS:
        raise UsageError(f"device must be one of {_KINDS}, got {preference!r}")
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    if preference == "cuda":
        raise DeviceError(
            "device 'cuda' was requested but this machine has no usable CUDA GPU "
            "(torch.cuda.is_available() is False); use auto or cpu"
        )
    mps = getattr(torch.backends, "mps", None)
    if preference in ("auto", "mps") and mps is not None and mps.is_available():
        return torch.device("mps")
    if preference == "mps":
        raise DeviceError("device 'mps' was requested but MPS is not available on this machine; use auto or cpu")
    return torch.device("cpu")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX). Without it torch emulates bf16, far slower
    than fp32 (``benchmarks/bench_matmul.py`` measures both; docs/results.md)."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA, and on the CPU when asked and the CPU has native bf16; a disabled context
    otherwise (and on MPS).

    Upstream trains in bf16 on GPUs. On a CPU with native bf16 (AVX512-BF16 or AMX) the demo's training step
    is faster in bf16 (``benchmarks/bench_pretrain_step.py``). On a CPU without it, bf16 would be emulated and
    far slower: the run stays in fp32 and says so once.
    """
    enabled = bool(bf16) and device.type in ("cuda", "cpu")
    if enabled and device.type == "cpu" and not cpu_has_native_bf16():
        _warn_emulated_bf16()
        enabled = False
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)


@functools.cache
def _warn_emulated_bf16() -> None:
    print(
        "ijepa: this CPU has no native bf16 (AVX512-BF16 or AMX), where bf16 runs about 100x slower than fp32: "
        "bf16 autocast is off and this process computes in fp32",
        file=sys.stderr,
    )
