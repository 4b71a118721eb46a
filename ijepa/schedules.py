"""Per-step schedules, precomputed so that a resumed run just indexes them (no replay).

Formulas follow upstream ``src/utils/schedulers.py`` and ``src/train.py``: the value used at training
step s (0-based) is the scheduler's (s + 1)-th ``step()`` for lr and wd, and the s-th momentum value.
All are defined over ``T = int(ipe_scale * epochs * ipe)`` steps while training stops after
``epochs * ipe`` steps (``ipe_scale > 1`` stretches the schedules, as upstream).
Deliberate differences: past T (``ipe_scale < 1``) the cosine stays at its final value instead of rising,
and the EMA momentum stays at its final value instead of growing past it (above 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Schedules:
    """lr, weight decay and EMA momentum for every training step (arrays of length ``total_steps``)."""

    lr: np.ndarray
    wd: np.ndarray
    momentum: np.ndarray

    @property
    def total_steps(self) -> int:
        return len(self.lr)


def warmup_cosine(steps: int, *, warmup: int, start: float, ref: float, final: float, t_max: int) -> np.ndarray:
    """lr per step: linear warmup start -> ref over ``warmup`` steps, then cosine ref -> final at ``t_max``."""
    k = np.arange(1, steps + 1, dtype=np.float64)
    warm = start + k / max(warmup, 1) * (ref - start)
    p = np.clip((k - warmup) / max(1, t_max - warmup), 0.0, 1.0)
    cos = np.maximum(final, final + (ref - final) * 0.5 * (1.0 + np.cos(np.pi * p)))
    return np.where(k < warmup, warm, cos)


def cosine_ramp(steps: int, *, ref: float, final: float, t_max: int) -> np.ndarray:
    """Weight decay per step: cosine from ``ref`` to ``final`` at ``t_max``, clipped at ``final``."""
    k = np.arange(1, steps + 1, dtype=np.float64)
    wd = final + (ref - final) * 0.5 * (1.0 + np.cos(np.pi * np.clip(k / max(t_max, 1), 0.0, 1.0)))
    return np.maximum(wd, final) if final <= ref else np.minimum(wd, final)


def linear_momentum(steps: int, *, start: float, end: float, t_max: float) -> np.ndarray:
    """EMA momentum per step: start + s * (end - start) / t_max (the first step uses ``start``), never past
    ``end`` (upstream's rises above 1 after t_max when ``ipe_scale < 1``, pushing the target away from the
    encoder)."""
    m = start + np.arange(steps, dtype=np.float64) * (end - start) / t_max
    return np.minimum(m, end) if end >= start else np.maximum(m, end)


def make_schedules(
    *,
    ipe: int,
    epochs: int,
    warmup_epochs: float,
    start_lr: float,
    lr: float,
    final_lr: float,
    weight_decay: float,
    final_weight_decay: float,
    ema: tuple[float, float],
    ipe_scale: float = 1.0,
) -> Schedules:
    """Upstream's three schedules for ``ipe * epochs`` training steps.

    Args:
        ipe: iterations (optimizer steps) per epoch.
        epochs: epochs trained.
        warmup_epochs: warmup length in epochs.
        start_lr, lr, final_lr: warmup start, peak and cosine floor.
        weight_decay, final_weight_decay: wd at the start and end of the cosine ramp.
        ema: (start, end) momentum.
        ipe_scale: schedule stretch factor (upstream default 1.25 in code, 1.0 in every config).
    """
    if ipe < 1 or epochs < 1:
        raise ValueError(f"ipe and epochs must be >= 1, got ipe={ipe}, epochs={epochs}")
    steps = ipe * epochs
    t_max = int(ipe_scale * epochs * ipe)
    return Schedules(
        lr=warmup_cosine(steps, warmup=int(warmup_epochs * ipe), start=start_lr, ref=lr, final=final_lr, t_max=t_max),
        wd=cosine_ramp(steps, ref=weight_decay, final=final_weight_decay, t_max=t_max),
        momentum=linear_momentum(steps, start=ema[0], end=ema[1], t_max=ipe * epochs * ipe_scale),
    )
