"""Training and evaluating segmentation heads; saving and loading a self-contained segmenter file."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import CheckpointError, atomic_save, load_state_strict, read_checkpoint
from ..data.loaders import IMAGENET_MEAN, IMAGENET_STD, Normalize
from ..data.workers import worker_context
from ..device import autocast
from ..distributed import all_reduce_mean, broadcast_buffers, ddp
from ..engine import NonFiniteLossError
from ..models.vit import VisionTransformer
from .data import IGNORE, SegClasses, SegDataset, collate_eval, collate_train
from .metrics import ConfusionMatrix
from .model import SegmentationModel

SEGMENTER_FORMAT = "ijepa-segmenter"


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


def lr_at(step: int, total: int, warmup: int, spec: SegTrainSpec) -> float:
    """Linear warmup from 0, then poly or cosine decay to ``min_lr``."""
    if step < warmup:
        return spec.lr * (step + 1) / max(warmup, 1)
    p = min((step - warmup) / max(total - warmup, 1), 1.0)
    if spec.schedule == "poly":
        return spec.min_lr + (spec.lr - spec.min_lr) * (1 - p) ** spec.poly_power
    if spec.schedule == "cosine":
        return spec.min_lr + (spec.lr - spec.min_lr) * 0.5 * (1 + math.cos(math.pi * p))
    raise ValueError(f"schedule must be 'poly' or 'cosine', got {spec.schedule!r}")


def _loader(
    ds: SegDataset, batch_size: int, workers: int, train: bool, seed: int, rank: int = 0, world_size: int = 1
) -> torch.utils.data.DataLoader:
    """Training: a seeded permutation per epoch (``set_epoch``), cut into ``world_size`` disjoint shares
    (DistributedSampler: the union of the ranks' i-th batches is one process's i-th batch of the same size
    times world_size). Evaluation: every image once, in order (one process)."""
    sampler = None
    if train:
        sampler = torch.utils.data.DistributedSampler(
            ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(ds) // world_size >= batch_size,
        num_workers=workers,
        collate_fn=collate_train if train else collate_eval,
        persistent_workers=False,
        multiprocessing_context=worker_context() if workers else None,  # fork-safe: see worker_context
    )


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
) -> list[dict]:
    """Cross-entropy (ignore 255), AdamW, warmup + poly/cosine per step, bf16 autocast (CUDA or CPU).

    Distributed (a process group of ``world_size`` ranks): DDP (SyncBatchNorm on CUDA), each rank a disjoint
    ``spec.batch_size`` share of every global batch, the logged loss averaged over ranks; ``model`` itself
    (unwrapped) holds the trained weights on every rank.

    Returns:
        per-epoch {"epoch", "loss", "lr"} (the final weights are what is kept: no selection on validation).
    """
    torch.manual_seed(seed)
    model.to(device).train()
    head = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("encoder.")]
    enc = [p for n, p in model.named_parameters() if p.requires_grad and n.startswith("encoder.")]
    groups = [{"params": head, "lr_scale": 1.0}]
    if enc:
        groups.append({"params": enc, "lr_scale": spec.encoder_lr_scale})
    opt = torch.optim.AdamW(groups, lr=spec.lr, weight_decay=spec.weight_decay)
    net = ddp(model, device) if world_size > 1 else model
    loader = _loader(train_ds, spec.batch_size, spec.num_workers, True, seed, rank, world_size)
    if len(loader) == 0:
        raise ValueError(f"segmentation training set has {len(train_ds)} images: fewer than one batch")
    total, warmup = spec.epochs * len(loader), round(spec.warmup_epochs * len(loader))
    norm, step, history = Normalize(), 0, []
    bar = tqdm(total=total, desc=desc, mininterval=5, disable=rank != 0)
    for epoch in range(spec.epochs):
        train_ds.set_epoch(epoch)
        loader.sampler.set_epoch(epoch)
        running, n = 0.0, 0
        for imgs, masks in loader:
            lr = lr_at(step, total, warmup, spec)
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
    bar.close()
    broadcast_buffers(model)
    return history


@torch.no_grad()
def predict_ids(model: SegmentationModel, imgs: torch.Tensor, sizes: Sequence[tuple[int, int]], device, bf16=False):
    """uint8 BGR (B, H, W, 3) at the model size -> list of (h_i, w_i) class-id tensors at each original size."""
    model.eval()
    with autocast(device, bf16):
        logits = model(Normalize()(imgs, device)).float()
    return [
        F.interpolate(logits[i : i + 1], size=tuple(s), mode="bilinear", align_corners=False)[0].argmax(0).cpu()
        for i, s in enumerate(sizes)
    ]


def evaluate_segmentation(
    model: SegmentationModel,
    ds: SegDataset,
    num_classes: int,
    device: torch.device,
    *,
    batch_size: int = 16,
    num_workers: int = 1,
    bf16: bool = False,
    desc: str = "seg_eval",
) -> tuple[dict, ConfusionMatrix]:
    """Dataset-level confusion at each mask's own resolution (logits upsampled to it)."""
    cm = ConfusionMatrix(num_classes)
    for imgs, masks in tqdm(_loader(ds, batch_size, num_workers, False, 0), desc=desc, mininterval=5):
        preds = predict_ids(model, imgs, [m.shape for m in masks], device, bf16)
        for p, m in zip(preds, masks, strict=True):
            cm.update(p, m)
    return cm.compute(), cm


@dataclass(frozen=True)
class SegPreprocess:
    """Model input size (H, W) and normalisation, stored with the segmenter."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def save_segmenter(path: str | Path, model: SegmentationModel, classes: SegClasses, pre: SegPreprocess, **info) -> None:
    """Atomic save of everything ``ijepa segment`` needs: weights, architecture, classes and colours, input size."""
    atomic_save(
        {
            "format": SEGMENTER_FORMAT,
            "format_version": 1,
            "model": model.state_dict(),
            "config": model.config(),
            "classes": classes.to_dict(),
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(pre).items()},
            "info": info,
        },
        path,
    )


def load_segmenter(path: str | Path) -> tuple[SegmentationModel, SegClasses, SegPreprocess]:
    """Rebuild a segmenter from its file alone (model in eval mode)."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != SEGMENTER_FORMAT:
        raise CheckpointError(
            f"{path} is not a segmenter (format {ckpt.get('format')!r}); train one with the seg_train stage"
        )
    cfg = ckpt["config"]
    model = SegmentationModel(
        VisionTransformer(**cfg["encoder_arch"]),
        cfg["num_classes"],
        head=cfg["head"],
        layers=cfg["layers"],
        freeze_encoder=cfg["freeze_encoder"],
        decoder_width=cfg["decoder_width"],
    )
    load_state_strict(model, ckpt["model"], f"{path} [model]")
    pp = ckpt["preprocess"]
    pre = SegPreprocess(pp["height"], pp["width"], tuple(pp["mean"]), tuple(pp["std"]))
    return model.eval(), SegClasses.from_dict(ckpt["classes"], f"{path} [classes]"), pre


def colorize(ids: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """(H, W) ids -> (H, W, 3) RGB with ``colors[id]`` (ignore / out-of-range ids black)."""
    lut = np.zeros((256, 3), np.uint8)
    lut[: len(colors)] = np.asarray(colors, np.uint8)
    return lut[np.asarray(ids, np.uint8)]


def overlay(img_bgr: np.ndarray, ids: np.ndarray, colors: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend the colour mask over a BGR image (both at the image's size)."""
    color_bgr = colorize(ids, colors)[..., ::-1]
    return (img_bgr.astype(np.float32) * (1 - alpha) + color_bgr.astype(np.float32) * alpha).round().astype(np.uint8)
