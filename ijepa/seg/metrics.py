"""Segmentation metrics from one dataset-level confusion matrix (the mmseg/dinov2 definition).

The sovit fork averages per-batch mIoUs, divides by n_batches + 1, scores classes absent from a batch as
IoU 0 and has no ignore label; here: one confusion matrix over the whole dataset at the masks' own
resolution, ignore pixels (255) left out, and classes with an empty union (absent from both ground truth
and prediction) left out of the mean.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import IGNORE


class ConfusionMatrix:
    """Accumulates ``counts[true, pred]`` over batches."""

    def __init__(self, num_classes: int, ignore_index: int = IGNORE):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """pred, target: integer tensors of the same shape (any batch layout)."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
        pred, target = pred.reshape(-1).long().cpu(), target.reshape(-1).long().cpu()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        if target.numel() and (int(target.max()) >= self.num_classes or int(target.min()) < 0):
            raise ValueError(f"target holds class ids outside 0..{self.num_classes - 1} (and {self.ignore_index})")
        k = self.num_classes
        self.counts += torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)

    def compute(self) -> dict:
        """{"miou", "pixel_acc", "iou" (per class, NaN for empty union), "acc" (per class recall)}."""
        c = self.counts.double()
        tp = c.diag()
        union = c.sum(0) + c.sum(1) - tp
        iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
        gt = c.sum(1)
        acc = torch.where(gt > 0, tp / gt.clamp(min=1), torch.full_like(tp, float("nan")))
        total = c.sum()
        present = ~torch.isnan(iou)
        return {
            "miou": float(iou[present].mean()) if present.any() else float("nan"),
            "pixel_acc": float(tp.sum() / total) if total > 0 else float("nan"),
            "iou": iou.tolist(),
            "acc": acc.tolist(),
        }


def miou_from_counts(counts: np.ndarray) -> float:
    """mIoU of a given confusion matrix (for hand checks)."""
    cm = ConfusionMatrix(len(counts))
    cm.counts = torch.as_tensor(np.asarray(counts), dtype=torch.int64)
    return cm.compute()["miou"]
