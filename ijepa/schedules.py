"""Per-step schedules, precomputed so that a resumed run just indexes them (no replay).

Formulas follow upstream ``src/utils/schedulers.py`` and ``src/train.py``: the value used at training
step s (0-based) is the scheduler's (s + 1)-th ``step()`` for lr and wd, and the s-th momentum value.
All are defined over ``T = int(ipe_scale * epochs * ipe)`` steps while training stops after
``epochs * ipe`` steps (``ipe_scale > 1`` stretches the schedules, as upstream).
Deliberate differences: past T (``ipe_scale < 1``) the cosine stays at its final value instead of rising,
and the EMA momentum stays at its final value instead of growing past it (above 1); an lr whose final value
exceeds its peak rises to it (upstream holds it at the final value from the first cosine step).
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


def warmup_cosine(k, *, warmup: int, total: int, ref: float, start: float = 0.0, final: float = 0.0, power=None):
    """The one warmup-plus-decay schedule of every training loop, at position ``k`` (an int or an array).

    Linear from ``start`` to ``ref`` while ``k < warmup``, then cosine (or, given ``power``, polynomial
    ``(1 - p) ** power``) from ``ref`` to ``final`` at ``k = total``, held at ``final`` after it. The caller says
    which step ``k`` is: pretraining passes step + 1 (upstream steps its scheduler before the step it sets),
    finetuning passes step (MAE's: the first step has lr 0), the probes and segmentation step + 1 (the first
    step has ``ref / warmup``). Returns a float for an int ``k``, an array for an array.
    """
    k = np.asarray(k, dtype=np.float64)
    warm = start + k / max(warmup, 1) * (ref - start)
    p = np.clip((k - warmup) / max(1, total - warmup), 0.0, 1.0)
    decay = 0.5 * (1.0 + np.cos(np.pi * p)) if power is None else (1.0 - p) ** power
    value = final + (ref - final) * decay
    value = np.maximum(final, value) if final <= ref else np.minimum(final, value)  # upstream's clamp
    out = np.where(k < warmup, warm, value)
    return float(out) if out.ndim == 0 else out


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
    k = np.arange(1, steps + 1)  # step s uses the scheduler's (s + 1)-th value
    return Schedules(
        lr=warmup_cosine(k, warmup=int(warmup_epochs * ipe), total=t_max, start=start_lr, ref=lr, final=final_lr),
        wd=warmup_cosine(k, warmup=0, total=t_max, ref=weight_decay, final=final_weight_decay),
        momentum=linear_momentum(steps, start=ema[0], end=ema[1], t_max=ipe * epochs * ipe_scale),
    )
