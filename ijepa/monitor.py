"""Health monitors for pretraining: is the target encoder learning, or collapsing?

I-JEPA has no negative pairs; a run can lose most of its feature dimensions (partial collapse) while the loss
still looks fine, and today that shows only after a full evaluation. A ``HealthMonitor`` holds a fixed set of
images (a bank of training images with labels and a query set of validation images, centre-cropped once)
and, whenever it is called, embeds them with the target encoder (eval mode, no gradients, no random draws:
the training RNG and hence exact resume are untouched) and reports:

- ``rankme``: the effective rank of the pooled features (Garrido et al., 2023, "RankMe"): exp of the entropy
  of the normalised singular values; between 1 (every image maps to one direction) and the feature width;
- ``feature_spread``: the per-dimension standard deviation of the L2-normalised features, averaged over
  dimensions and scaled by sqrt(D) (the SimSiam collapse check): about 1 for features spread over the
  sphere, 0 when every image gets the same feature;
- ``knn_top1``: weighted k-NN top-1 of the queries against the bank (cosine, temperature 0.07).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .device import autocast
from .errors import UserError
from .eval.features import pooled_features
from .eval.knn import knn_accuracy
from .models.vit import VisionTransformer


class CollapseError(UserError, RuntimeError):
    """The monitored rank fell below its floor and the run was told to stop (a user-facing outcome of the params)."""


def rankme(features: torch.Tensor, eps: float = 1e-7) -> float:
    """Effective rank of (N, D) features: exp(-sum p_k log p_k), p = singular values / their sum + eps."""
    s = torch.linalg.svdvals(features.double())
    p = s / s.sum().clamp_min(1e-12) + eps
    return float(torch.exp(-(p * p.log()).sum()))


def feature_spread(features: torch.Tensor) -> float:
    """sqrt(D) x the mean per-dimension std of L2-normalised (N, D) features (1: spread out, 0: collapsed)."""
    z = F.normalize(features.double(), dim=1)
    return float(z.std(dim=0).mean() * math.sqrt(z.shape[1]))


class HealthMonitor:
    """Fixed images and the three health numbers of an encoder on them.

    Args:
        bank: (N, H, W, 3) uint8 BGR training images (as the loaders give them), ``bank_labels`` (N,).
        queries: (M, H, W, 3) validation images, ``query_labels`` (M,).
        num_classes: C for the k-NN vote.
        prepare: loader images -> model input on ``device`` (``ijepa.data.transforms.Normalize``).
        device: where the encoder runs; bf16: autocast as in training.
        k: neighbours; batch_size: images per forward pass.
    """

    def __init__(
        self,
        bank: torch.Tensor,
        bank_labels: torch.Tensor,
        queries: torch.Tensor,
        query_labels: torch.Tensor,
        *,
        num_classes: int,
        prepare: Callable[[torch.Tensor, torch.device], torch.Tensor],
        device: torch.device,
        bf16: bool = False,
        k: int = 20,
        batch_size: int = 256,
    ):
        if len(bank) < k:
            raise ValueError(f"the monitor's bank holds {len(bank)} images, fewer than k={k}")
        if len(queries) == 0:
            raise ValueError("the monitor needs at least one query image")
        self.bank, self.bank_labels = bank, bank_labels.long()
        self.queries, self.query_labels = queries, query_labels.long()
        self.num_classes, self.prepare, self.device = num_classes, prepare, device
        self.bf16, self.k, self.batch_size = bf16, k, batch_size

    @torch.no_grad()
    def _embed(self, encoder: VisionTransformer, images: torch.Tensor) -> torch.Tensor:
        out = []
        for lo in range(0, len(images), self.batch_size):
            x = self.prepare(images[lo : lo + self.batch_size], self.device)
            with autocast(self.device, self.bf16):
                out.append(pooled_features(encoder, x)["avg_last"].cpu())
        return torch.cat(out)

    def __call__(self, encoder: VisionTransformer) -> dict[str, float]:
        """{"rankme", "feature_spread", "knn_top1"} of ``encoder`` (its train/eval mode is restored)."""
        was_training = encoder.training
        encoder.eval()
        try:
            bank, queries = self._embed(encoder, self.bank), self._embed(encoder, self.queries)
        finally:
            encoder.train(was_training)
        everything = torch.cat([bank, queries])
        knn = knn_accuracy(
            bank, self.bank_labels, queries, self.query_labels, num_classes=self.num_classes, ks=(self.k,)
        )
        return {
            "rankme": round(rankme(everything), 4),
            "feature_spread": round(feature_spread(everything), 5),
            "knn_top1": round(knn[self.k], 5),
        }
