"""Registering the stages' models in MLflow: the target encoder, the classifier and the segmenter, packaged for
serving (``ijepa.serving``: uint8 RGB images in), each with a real input example from the data."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ijepa.data.loaders import eval_loader
from ijepa.data.transforms import eval_transform
from ijepa.serving import served

from .context import StageContext
from .params import TrackingParams


def example_images(urls: Sequence[str], crop_size: int, resize_size: int | None = None, n: int = 2) -> np.ndarray:
    """The first ``n`` images of the shards as the served models take them: (n, S, S, 3) uint8 RGB, cropped as
    the evaluation loaders (and ``ijepa classify``) crop them."""
    loader = eval_loader(urls, batch_size=n, transform=eval_transform(crop_size, resize_size), num_workers=0)
    images, _, _ = next(iter(loader))
    return np.ascontiguousarray(images.numpy()[..., ::-1])


def register_model(tracker, ctx: StageContext, tracking: TrackingParams, kind: str, model, example: np.ndarray):
    """Log ``model`` as the MLflow model ``ijepa-<kind>`` of this stage's run and register a new version; a
    workspace run (``dvc repro``, ``make repro``) moves ``tracking.model_alias`` to it, a DVC experiment does not.

    Args:
        kind: "encoder", "classifier" or "segmenter" (``ijepa.serving.served``).
        example: uint8 RGB images (B, H, W, 3) at the model's input size (logged as float32 values 0-255).
    """
    alias = tracking.model_alias if ctx.exp_name is None else None
    # A float32 signature, not uint8: MLflow's server parses a JSON request into the signature's dtype, and into
    # uint8 it would silently truncate fractional values (images scaled to 0-1); as float32 they reach the model,
    # which refuses anything but integers 0-255. A numpy caller passes float32 (MLflow refuses uint8 for it, loudly).
    tracker.log_model(served(kind, model), f"ijepa-{kind}", example.astype(np.float32), alias)
