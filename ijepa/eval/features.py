"""The shared feature core: one frozen forward pass gives both of the paper's poolings.

- ``avg_last``: the average of the last layer's patch tokens (after the final LayerNorm), D values;
- ``avg_last4``: the concatenated averages of the last 4 layers' tokens (each through the final
  LayerNorm), 4D values (the VISSL/I-JEPA "last 4 layers" probe input);
- optionally ``tokens``: the last layer's patch tokens themselves (after the final LayerNorm), (L, D) in
  float16, for the attentive probe; for raw pixels the tokens are the image's patches (L, 3 p^2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoint import atomic_save, load_encoder, read_checkpoint
from ..device import autocast
from ..models.vit import VisionTransformer, random_like

POOLINGS = ("avg_last", "avg_last4")


def frozen_encoders(
    checkpoint: str | Path, which: str, seed: int, device: torch.device
) -> dict[str, VisionTransformer]:
    """{"pretrained": the checkpoint's ``which`` encoder, "random_init": the same architecture initialised from
    ``seed``}, both in eval mode on ``device``: the two encoders every frozen evaluation compares."""
    encoder = load_encoder(checkpoint, which=which).eval().to(device)
    return {"pretrained": encoder, "random_init": random_like(encoder, seed).eval().to(device)}


@torch.no_grad()
def pooled_features(encoder: VisionTransformer, images: torch.Tensor, tokens: bool = False) -> dict[str, torch.Tensor]:
    """(B, 3, H, W) normalised images -> {"avg_last": (B, D), "avg_last4": (B, 4D)} in float32, and with
    ``tokens`` the last layer's {"tokens": (B, L, D)} in float16."""
    layers = encoder.get_intermediate_layers(images, n=min(4, encoder.depth), norm=True)
    means = [t.float().mean(dim=1) for t in layers]
    while len(means) < 4:  # encoders shallower than 4 blocks repeat their first layer
        means.insert(0, means[0])
    out = {"avg_last": means[-1], "avg_last4": torch.cat(means, dim=1)}
    if tokens:
        out["tokens"] = layers[-1].half()
    return out


def pixel_tokens(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, L, 3 p^2) float16: the non-overlapping p x p patches, the pixels' "tokens"."""
    return F.unfold(images.float(), patch_size, stride=patch_size).transpose(1, 2).half()


@torch.no_grad()
def extract_features(
    encoders: Mapping[str, VisionTransformer],
    batches: Iterable[tuple[torch.Tensor, torch.Tensor, list[str]]],
    *,
    prepare: Callable[[torch.Tensor], torch.Tensor],
    device: torch.device,
    bf16: bool = False,
    pixel_size: int | None = None,
    tokens: bool = False,
    progress: str | None = None,
    total: int | None = None,
) -> dict[str, dict]:
    """Run frozen encoders (and optionally a raw-pixel baseline) over one loader pass.

    Args:
        encoders: name -> encoder in eval mode on ``device``; all see the very same batches.
        batches: (images as the loader gives them, labels (B,), keys) — e.g. ``ijepa.data.eval_loader``.
        prepare: loader images -> model input on ``device`` (``ijepa.data.transforms.Normalize``).
        bf16: bf16 autocast (CUDA or CPU).
        pixel_size: also return "pixels": the normalised input average-pooled to this side, flattened.
        tokens: also return every encoder's last-layer "tokens" (N, L, D) and the pixels' patches (N, L, 3 p^2)
            (p: the first encoder's patch size) in float16.
        progress: progress-bar label (None: no bar); total: number of batches for the bar.
    Returns:
        name -> {"avg_last": (N, D), "avg_last4": (N, 4D), "labels": (N,), "keys": [N]} sorted by key
        (+ "tokens"); "pixels" -> {"pixels": (N, 3 * s * s), "labels", "keys"} (+ "tokens") when
        ``pixel_size`` is set.
    """
    outputs = (*POOLINGS, "tokens") if tokens else POOLINGS
    feats: dict[str, dict[str, list]] = {n: {p: [] for p in outputs} for n in encoders}
    if pixel_size is not None:
        feats["pixels"] = {"pixels": [], "tokens": []} if tokens else {"pixels": []}
    patch = next(iter(encoders.values())).patch_size if encoders else None
    labels, keys = [], []
    for imgs, lbls, ks in tqdm(batches, desc=progress, total=total, disable=progress is None, mininterval=5):
        x = prepare(imgs)
        with autocast(device, bf16):
            for name, enc in encoders.items():
                for p, t in pooled_features(enc, x, tokens).items():
                    feats[name][p].append(t.cpu())
        if pixel_size is not None:
            feats["pixels"]["pixels"].append(
                F.adaptive_avg_pool2d(x.float(), min(pixel_size, x.shape[-1])).flatten(1).cpu()
            )
            if tokens:
                feats["pixels"]["tokens"].append(pixel_tokens(x, patch).cpu())
        labels.append(torch.as_tensor(lbls))
        keys += list(ks)
    if not keys:
        raise ValueError("extract_features got no batches")
    order = sorted(range(len(keys)), key=keys.__getitem__)
    idx = torch.tensor(order)
    common = {"labels": torch.cat(labels)[idx], "keys": [keys[i] for i in order]}
    return {n: {p: torch.cat(v)[idx] for p, v in f.items()} | common for n, f in feats.items()}


def merge_features(shares: list[dict[str, dict]]) -> dict[str, dict]:
    """``extract_features`` results of disjoint shares of one split (one per rank) -> the result one process
    would give: every tensor concatenated, then ordered by key."""
    if len(shares) == 1:
        return shares[0]
    keys = [k for s in shares for k in next(iter(s.values()))["keys"]]
    idx = torch.tensor(sorted(range(len(keys)), key=keys.__getitem__))
    merged = {}
    for name in shares[0]:
        merged[name] = {p: torch.cat([s[name][p] for s in shares])[idx] for p in shares[0][name] if p != "keys"} | {
            "keys": [keys[i] for i in idx.tolist()]
        }
    return merged


def save_features(path: str | Path, features: dict, **meta) -> None:
    """Atomically save a features dict plus metadata (weights-only loadable)."""
    atomic_save({**features, "meta": meta}, path)


def load_features(path: str | Path) -> dict:
    """Load a features file written by ``save_features``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: run the extract stage first (dvc repro extract)")
    return read_checkpoint(path, what="features file", keys=("meta",))
