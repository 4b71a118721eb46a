"""Linear-probe grid: many linear heads (learning rates x poolings, optionally batch-norm) trained together.

All heads read the same cached features and heads sharing an input are one batched layer, so the whole
grid costs little more than one head (dinov2's ``eval/linear.py`` idea). Each head has its own lr; the best
is chosen on validation only and then reported on test.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from ..schedules import warmup_cosine


@dataclass(frozen=True)
class HeadSpec:
    pooling: str
    lr: float
    batchnorm: bool

    @property
    def name(self) -> str:
        return f"{self.pooling}_lr{self.lr:g}" + ("_bn" if self.batchnorm else "")


class HeadBank(nn.Module):
    """All heads that read one (pooling, batch-norm) input, as one batched linear layer.

    BatchNorm1d without affine parameters (MAE's probe) does not depend on the head, so it is computed once;
    each head then has its own weights (H, D, C), initialised N(0, 0.01), and its own learning rate.
    """

    def __init__(self, dim: int, num_classes: int, n_heads: int, batchnorm: bool):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6) if batchnorm else nn.Identity()
        self.weight = nn.Parameter(torch.randn(n_heads, dim, num_classes) * 0.01)
        self.bias = nn.Parameter(torch.zeros(n_heads, 1, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (H, N, C) logits of every head."""
        return torch.einsum("nd,hdc->hnc", self.bn(x), self.weight) + self.bias


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
    splits = [s for s in ("train", "val", "test") if s in features]
    if "train" not in features or "val" not in features:
        raise DataError(  # prepare refuses to write shards without a val split; older features may lack it
            "the probe needs 'train' and 'val' features (val picks the head; test is only reported): rerun prepare "
            "with prepare.val_fraction > 0, then extract"
        )
    # Standardising with train statistics keeps one lr grid meaningful across poolings and feature scales.
    data = {}
    for p in poolings:
        for s, t in zip(splits, _standardise(*[features[s][p].float() for s in splits]), strict=True):
            data[(s, p)] = t.to(device)
    y = {s: labels[s].to(device) for s in splits}
    banks = {
        (p, bn): HeadBank(data[("train", p)].shape[1], num_classes, len(lrs), bn).to(device)
        for p in poolings
        for bn in batchnorm
    }
    head_lr = torch.tensor(list(lrs), device=device).view(-1, 1, 1)
    params = [q for bank in banks.values() for q in (bank.weight, bank.bias)]
    momentum = [torch.zeros_like(q) for q in params]
    n = len(y["train"])
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        for bank in banks.values():
            bank.train()
        perm = torch.randperm(n, generator=g).to(device)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            if len(idx) < 2:
                continue
            target = y["train"][idx]
            loss = sum(
                F.cross_entropy(bank(data[("train", p)][idx]).flatten(0, 1), target.repeat(len(lrs)), reduction="sum")
                / len(idx)
                for (p, _), bank in banks.items()
            )
            grads = torch.autograd.grad(loss, params)
            scale = warmup_cosine(step, warmup=0, total=total, ref=1.0)  # per-head base lr
            with torch.no_grad():  # SGD, momentum 0.9, weight decay, one lr per head
                for q, grad, buf in zip(params, grads, momentum, strict=True):
                    buf.mul_(0.9).add_(grad + weight_decay * q)
                    q.sub_(scale * head_lr * buf)
            step += 1
    table = []
    with torch.no_grad():
        for (p, bn), bank in banks.items():
            bank.eval()
            logits = {s: bank(data[(s, p)]) for s in splits[1:]}
            for h, lr in enumerate(lrs):
                row = {"head": HeadSpec(p, lr, bn).name, "pooling": p, "lr": lr, "batchnorm": bn}
                for s in splits[1:]:
                    correct = topk_correct(logits[s][h], y[s])
                    row[f"{s}_top1"] = correct[1] / len(y[s])
                    row[f"{s}_top5"] = correct[5] / len(y[s])
                table.append(row)
    best = max(table, key=lambda r: (r["val_top1"], -r["lr"]))
    out = {"best": best["head"], "table": table, "val_top1": best["val_top1"]}
    if "test" in splits:
        out |= {"test_top1": best["test_top1"], "test_top5": best["test_top5"]}
    return out
