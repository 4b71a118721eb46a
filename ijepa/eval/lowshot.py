"""Low-shot linear probes on cached features: a few labelled training images per class, or a fraction of them.

The I-JEPA paper reports ImageNet-1% (about 13 images per class); k-shot (1, 5, 10 images per class) is
the common finer view. Each protocol draws several seeded, class-stratified subsets of the training split;
every subset trains the linear-probe grid (``ijepa.eval.linear.train_linear_grid``; the head is chosen on the
full validation split, as in the full probe) and is scored on test. Results are the mean and the spread over
subsets.
"""

from __future__ import annotations

import random
import statistics
from collections.abc import Mapping, Sequence

import torch

from .linear import train_linear_grid


def stratified_subset(
    labels: torch.Tensor, *, seed: int, per_class: int | None = None, fraction: float | None = None
) -> torch.Tensor:
    """Indices of ``per_class`` images of every class, or of ``fraction`` of each class's images (at least one),
    drawn with ``random.Random(seed)``; sorted.

    Raises:
        ValueError: when a class has fewer images than asked for, or neither/both of per_class and fraction.
    """
    if (per_class is None) == (fraction is None):
        raise ValueError("give exactly one of per_class and fraction")
    rng = random.Random(seed)
    chosen: list[int] = []
    for c in sorted(set(labels.tolist())):
        members = (labels == c).nonzero().flatten().tolist()
        k = per_class if per_class is not None else max(1, round(fraction * len(members)))
        if k > len(members):
            raise ValueError(f"class {c} has {len(members)} training images, fewer than the {k} asked for")
        chosen += rng.sample(members, k)
    return torch.tensor(sorted(chosen))


def protocols(shots: Sequence[int], fractions: Sequence[float]) -> dict[str, dict]:
    """Protocol name -> subset arguments: ``{k}shot`` for each k, ``{100 f:g}pct`` for each fraction."""
    out = {f"{f * 100:g}pct": {"fraction": f} for f in fractions}
    return out | {f"{k}shot": {"per_class": k} for k in shots}


def lowshot_probe(
    features: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    num_classes: int,
    protocol: Mapping,
    subsets: int,
    poolings: Sequence[str],
    seed: int = 0,
    **grid,
) -> dict:
    """One protocol on one feature set: ``subsets`` seeded training subsets, each with its linear-probe grid.

    Args:
        features: split -> {pooling: (N, D), "labels": (N,)}; "train", "val", "test".
        protocol: ``stratified_subset`` arguments (per_class or fraction).
        subsets: how many subsets (subset i is drawn with seed ``seed * 1000 + i``).
        poolings, grid: ``train_linear_grid``'s grid and optimisation (lrs, batchnorm, epochs, ...).
    Returns:
        {"test_top1": [per subset], "mean", "sd" (0 for one subset), "train_images", "heads": [best per subset]}.
    """
    tops, heads, n = [], [], 0
    for i in range(subsets):
        idx = stratified_subset(features["train"]["labels"], seed=seed * 1000 + i, **protocol)
        n = len(idx)
        train = {p: features["train"][p][idx] for p in poolings}
        res = train_linear_grid(
            {"train": train, **{s: features[s] for s in ("val", "test")}},
            {"train": features["train"]["labels"][idx], **{s: features[s]["labels"] for s in ("val", "test")}},
            num_classes=num_classes,
            poolings=poolings,
            seed=seed + i,
            **grid,
        )
        tops.append(res["test_top1"])
        heads.append(res["best"])
    return {
        "test_top1": tops,
        "mean": statistics.fmean(tops),
        "sd": statistics.stdev(tops) if len(tops) > 1 else 0.0,
        "train_images": n,
        "heads": heads,
    }
