"""Weighted k-NN classification on L2-normalised features (the dinov2/InstDisc protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_classify(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    query: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
    chunk: int = 1024,
) -> dict[int, torch.Tensor]:
    """Class scores of each query for several k.

    Cosine similarity to every training feature; the k nearest vote for their class with weight
    ``exp(sim / T)``. Computed in query chunks so memory stays at chunk x N_train.

    Args:
        train: (N, D) features; train_labels: (N,); query: (M, D).
        num_classes: C. ks: neighbour counts (capped at N). temperature: T.
    Returns:
        k -> (M, C) vote scores.
    """
    train = F.normalize(train.float(), dim=1)
    query = F.normalize(query.float(), dim=1)
    kmax = min(max(ks), len(train))
    out = {k: [] for k in ks}
    for start in range(0, len(query), chunk):
        sims = query[start : start + chunk] @ train.T
        top_sim, top_idx = sims.topk(kmax, dim=1)
        weights = (top_sim / temperature).exp()
        onehot = F.one_hot(train_labels[top_idx], num_classes).float()
        for k in ks:
            kk = min(k, kmax)
            out[k].append((onehot[:, :kk] * weights[:, :kk, None]).sum(1))
    return {k: torch.cat(v) for k, v in out.items()}


def knn_accuracy(
    train: torch.Tensor,
    train_labels: torch.Tensor,
    query: torch.Tensor,
    query_labels: torch.Tensor,
    *,
    num_classes: int,
    ks: Sequence[int] = (10, 20, 100, 200),
    temperature: float = 0.07,
) -> dict[int, float]:
    """Top-1 accuracy of weighted k-NN, per k."""
    scores = knn_classify(train, train_labels, query, num_classes=num_classes, ks=ks, temperature=temperature)
    return {k: float((s.argmax(1) == query_labels).float().mean()) for k, s in scores.items()}
