"""Linear-probe grid: many linear heads (learning rates x poolings, optionally batch-norm) trained together.

All heads read the same cached features, so the whole grid costs little more than one head (dinov2's
``eval/linear.py`` idea). Each head has its own lr; the best is chosen on validation only and then
reported on test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class HeadSpec:
    pooling: str
    lr: float
    batchnorm: bool

    @property
    def name(self) -> str:
        return f"{self.pooling}_lr{self.lr:g}" + ("_bn" if self.batchnorm else "")


class LinearHead(nn.Module):
    """Optional BatchNorm1d (no affine, as MAE's probe) then Linear; weights N(0, 0.01), bias 0."""

    def __init__(self, dim: int, num_classes: int, batchnorm: bool):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.linear = nn.Linear(dim, num_classes)
        nn.init.normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.bn(x))


def topk_correct(logits: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k predictions, per k (k capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top == labels[:, None]
    return {k: int(hit[:, : min(k, kmax)].any(1).sum()) for k in ks}


def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    mean, std = train.mean(0, keepdim=True), train.std(0, keepdim=True).clamp_min(1e-6)
    return [(t - mean) / std for t in (train, *others)]


def train_linear_grid(
    features: Mapping[str, Mapping[str, torch.Tensor]],
    labels: Mapping[str, torch.Tensor],
    *,
    num_classes: int,
    poolings: Sequence[str],
    lrs: Sequence[float],
    batchnorm: Sequence[bool] = (False,),
    epochs: int = 100,
    batch_size: int = 256,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | None = None,
) -> dict:
    """Train every head of the grid on ``train``, pick the best by ``val`` top-1, report it on ``test``.

    Args:
        features: split -> pooling -> (N, D) tensor; splits "train", "val" and optionally "test".
        labels: split -> (N,) class indices.
        num_classes: C.
        poolings, lrs, batchnorm: the grid (every combination is one head).
        epochs, batch_size, weight_decay: SGD (momentum 0.9) with a cosine schedule, shared by all heads.
        seed: shuffling and init.
    Returns:
        {"best": name, "table": [row per head with val/test top-1/top-5], "test_top1", "test_top5", "val_top1"}.
    """
    device = device or torch.device("cpu")
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    specs = [HeadSpec(p, lr, bn) for p in poolings for lr in lrs for bn in batchnorm]
    splits = [s for s in ("train", "val", "test") if s in features]
    if "train" not in features or "val" not in features:
        raise ValueError("the probe needs 'train' and 'val' features (val picks the head; test is only reported)")
    # Standardising with train statistics keeps one lr grid meaningful across poolings and feature scales.
    data = {}
    for p in poolings:
        for s, t in zip(splits, _standardise(*[features[s][p].float() for s in splits]), strict=True):
            data[(s, p)] = t.to(device)
    y = {s: labels[s].to(device) for s in splits}
    heads = nn.ModuleList(LinearHead(data[("train", sp.pooling)].shape[1], num_classes, sp.batchnorm) for sp in specs)
    heads.to(device)
    opt = torch.optim.SGD(
        [{"params": h.parameters(), "lr": sp.lr, "base_lr": sp.lr} for h, sp in zip(heads, specs, strict=True)],
        momentum=0.9,
        weight_decay=weight_decay,
    )
    n = len(y["train"])
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        heads.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            if len(idx) < 2:
                continue
            for group in opt.param_groups:
                group["lr"] = group["base_lr"] * 0.5 * (1 + math.cos(math.pi * step / total))
            loss = sum(
                F.cross_entropy(h(data[("train", sp.pooling)][idx]), y["train"][idx])
                for h, sp in zip(heads, specs, strict=True)
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
    heads.eval()
    table = []
    with torch.no_grad():
        for h, sp in zip(heads, specs, strict=True):
            row = {"head": sp.name, "pooling": sp.pooling, "lr": sp.lr, "batchnorm": sp.batchnorm}
            for s in splits[1:]:
                correct = topk_correct(h(data[(s, sp.pooling)]), y[s])
                row[f"{s}_top1"] = correct[1] / len(y[s])
                row[f"{s}_top5"] = correct[5] / len(y[s])
            table.append(row)
    best = max(table, key=lambda r: (r["val_top1"], -r["lr"]))
    out = {"best": best["head"], "table": table, "val_top1": best["val_top1"]}
    if "test" in splits:
        out |= {"test_top1": best["test_top1"], "test_top5": best["test_top5"]}
    return out
