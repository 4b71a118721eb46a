"""The one place that chooses an accelerator. Nothing else in the project calls ``.cuda()``."""

from __future__ import annotations

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


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA and on the CPU when asked; a disabled context otherwise (and on MPS).

    Upstream trains in bf16 on GPUs. On a CPU with native bf16 (AVX512-BF16 or AMX) the demo's training step
    is about 2x faster (``benchmarks/bench_pretrain_step.py``); without it autocast still works, more slowly.
    """
    enabled = bool(bf16) and device.type in ("cuda", "cpu")
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=enabled)
