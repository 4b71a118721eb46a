"""The pretraining loop: schedules indexed by global step, so a resumed run needs no replay."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from .device import autocast
from .errors import UserError
from .jepa import JEPA
from .schedules import Schedules

Batch = tuple[torch.Tensor, Sequence[torch.Tensor], Sequence[torch.Tensor]]


class NonFiniteLossError(UserError, RuntimeError):
    """The loss became NaN or Inf; raised before the optimizer step, so no weights were touched (user-facing: the
    params diverged)."""


@dataclass(frozen=True)
class StepLog:
    """What one optimizer step reports."""

    step: int
    epoch: int
    loss: float
    lr: float
    wd: float
    momentum: float
    k_enc: int
    k_pred: int
    seconds: float


def build_optimizer(jepa: JEPA) -> torch.optim.AdamW:
    """AdamW over upstream's four param groups (lr and wd are set from the schedules every step)."""
    return torch.optim.AdamW(jepa.param_groups(), lr=0.0, betas=(0.9, 0.999), eps=1e-8)


def _set_hparams(optimizer: torch.optim.Optimizer, lr: float, wd: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if not group.get("WD_exclude", False):
            group["weight_decay"] = wd


def train_epoch(
    jepa: JEPA,
    optimizer: torch.optim.Optimizer,
    schedules: Schedules,
    batches: Iterable[Batch],
    *,
    epoch: int,
    start_step: int,
    end_step: int,
    device: torch.device,
    bf16: bool = False,
    reduce_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> tuple[int, float]:
    """Run optimizer steps ``start_step .. end_step - 1`` over ``batches``.

    Args:
        jepa: the module (or a wrapper exposing ``update_target``), already on ``device``.
        optimizer: AdamW over ``jepa.param_groups()``.
        schedules: per-step lr / wd / momentum.
        batches: yields (images (B, C, H, W), masks_enc, masks_pred) for consecutive steps.
        epoch: for logging.
        start_step, end_step: global step range of this call.
        device: where tensors go.
        bf16: bf16 autocast (CUDA or CPU, ``ijepa.device.autocast``).
        reduce_loss: averages the detached loss over ranks (distributed runs) for logging and checks.
        on_step: receives a ``StepLog`` after every step.
        should_stop: asked after every step; True ends the call early at that step boundary (preemption).
            In distributed runs it must give the same answer on every rank (``ijepa.distributed.any_rank``).
    Returns:
        (next step, mean loss over the steps run); next step < ``end_step`` when stopped early.
    Raises:
        NonFiniteLossError: before the optimizer step of the first non-finite loss.
    """
    step, total = start_step, 0.0
    it = iter(batches)
    jepa.train()
    while step < end_step:
        t0 = time.perf_counter()
        try:
            imgs, masks_enc, masks_pred = next(it)
        except StopIteration:
            raise RuntimeError(
                f"data ran out at step {step}; the epoch needs {end_step - start_step} batches"
            ) from None
        imgs = imgs.to(device, non_blocking=True)
        masks_enc = [m.to(device, non_blocking=True) for m in masks_enc]
        masks_pred = [m.to(device, non_blocking=True) for m in masks_pred]
        lr, wd, mom = (float(a[step]) for a in (schedules.lr, schedules.wd, schedules.momentum))
        _set_hparams(optimizer, lr, wd)
        with autocast(device, bf16):
            loss = jepa(imgs, masks_enc, masks_pred)["loss"]
        logged = reduce_loss(loss.detach()) if reduce_loss is not None else loss.detach()
        value = float(logged)
        if not math.isfinite(value):
            raise NonFiniteLossError(f"loss is {value} at step {step} (epoch {epoch}); the last checkpoint is kept")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        jepa.update_target(mom)
        total += value
        if on_step is not None:
            on_step(
                StepLog(
                    step,
                    epoch,
                    value,
                    lr,
                    wd,
                    mom,
                    masks_enc[0].shape[1],
                    masks_pred[0].shape[1],
                    time.perf_counter() - t0,
                )
            )
        step += 1
        if should_stop is not None and step < end_step and should_stop():
            break
    return step, total / max(step - start_step, 1)
