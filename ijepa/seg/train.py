"""Training segmentation heads (the segmenter file: ``ijepa.seg.model``; prediction and evaluation:
``ijepa.seg.infer``)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..data.transforms import Normalize
from ..device import autocast
from ..distributed import all_reduce_mean, broadcast_buffers, ddp
from ..engine import NonFiniteLossError
from ..epochs import EpochLoop
from ..schedules import warmup_cosine
from .data import IGNORE, SegDataset, seg_loader
from .model import SegmentationModel


@dataclass(frozen=True, kw_only=True)  # by keyword only: no silent swap of two numbers
class SegTrainSpec:
    """Optimisation of a segmentation head (and the encoder when it is not frozen)."""

    epochs: int = 20
    batch_size: int = 16
    lr: float = 1e-3
    min_lr: float = 0.0
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    schedule: str = "poly"  # poly (power 0.9, mmseg's default) or cosine
    poly_power: float = 0.9
    encoder_lr_scale: float = 0.1  # lr multiplier of the encoder when it is finetuned
    bf16: bool = True
    num_workers: int = 1


def train_segmentation(
    model: SegmentationModel,
    train_ds: SegDataset,
    spec: SegTrainSpec,
    device: torch.device,
    *,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    desc: str = "seg_train",
    on_step: Callable[[dict], None] | None = None,
    state=None,
    should_stop: Callable[[], bool] | None = None,
) -> list[dict] | None:
    """Cross-entropy (ignore 255), AdamW, warmup + poly/cosine per step, bf16 autocast (CUDA or CPU).

    Distributed (a process group of ``world_size`` ranks): DDP (SyncBatchNorm on CUDA), each rank a disjoint
    ``spec.batch_size`` share of every global batch, the logged loss averaged over ranks; ``model`` itself
    (unwrapped) holds the trained weights on every rank.

    Args:
        state: where the run is saved after every epoch and resumed from (``load() -> dict | None``,
            ``save(dict)``; ``pipeline.resume.EpochState``): weights, optimiser, step, history and the random
            generators, so a resumed run ends bit-identical to an uninterrupted one on the CPU.
        should_stop: asked after every epoch (once its state is saved), the same answer on every rank.
    Returns:
        per-epoch {"epoch", "loss", "lr"} (the final weights are what is kept: no selection on validation), or
        None when ``should_stop`` stopped it.
    """
    if spec.schedule not in ("poly", "cosine"):
        raise ValueError(f"schedule must be 'poly' or 'cosine', got {spec.schedule!r}")
    torch.manual_seed(seed)
    model.to(device).train()
    head = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    enc = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    groups = [{"params": head, "lr_scale": 1.0}]
    if enc:
        groups.append({"params": enc, "lr_scale": spec.encoder_lr_scale})
    opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    net = ddp(model, device) if world_size > 1 else model
    loader = seg_loader(train_ds, spec.batch_size, spec.num_workers, True, seed, rank, world_size)
    if len(loader) == 0:
        raise ValueError(f"segmentation training set has {len(train_ds)} images: fewer than one batch")
    total, warmup = spec.epochs * len(loader), round(spec.warmup_epochs * len(loader))
    norm, step, history = Normalize(), 0, []
    power = spec.poly_power if spec.schedule == "poly" else None  # None: cosine
    loop = EpochLoop(spec.epochs, state, should_stop)
    if (saved := loop.saved) is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        step, history = saved["step"], saved["history"]
    bar = tqdm(total=total, initial=step, desc=desc, mininterval=5, disable=rank != 0)
    for epoch in loop:
        train_ds.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        running, n = 0.0, 0
        for imgs, masks in loader:
            lr = warmup_cosine(step + 1, warmup=warmup, total=total, ref=spec.lr, final=spec.min_lr, power=power)
            for g in opt.param_groups:
                g["lr"] = lr * g["lr_scale"]
            x, y = norm(imgs, device), masks.to(device)
            with autocast(device, spec.bf16):
                logits = net(x)
            loss = F.cross_entropy(logits.float(), y, ignore_index=IGNORE)
            value = float(all_reduce_mean(loss.detach()))  # the same on every rank: all stop together
            if not math.isfinite(value):
                raise NonFiniteLossError(f"{desc}: loss is {value} at step {step}; lower the lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running, n, step = running + value, n + 1, step + 1
            bar.update(1)
            bar.set_postfix(loss=f"{value:.3f}", epoch=epoch, refresh=False)
            if on_step is not None:
                on_step({"step": step, "epoch": epoch, "loss": value, "lr": lr})
        history.append({"epoch": epoch + 1, "loss": running / max(n, 1), "lr": lr})
        loop.end(epoch, {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step, "history": history})
    bar.close()
    if loop.stopped:
        return None
    broadcast_buffers(model)
    return history
