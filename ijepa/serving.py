"""Models packaged for serving (MLflow models, any runtime that feeds tensors): uint8 RGB images in, predictions
out, with the normalisation inside, so a caller needs no project code to prepare inputs.

Inputs are (B, H, W, 3) RGB values 0-255 at the model's input size (uint8, or a float or integer tensor holding
integers 0-255; anything else is refused): for the encoder and the classifier the evaluation
crop (resize the short side to ``resize_size``, centre-crop ``crop_size``, as ``ijepa classify`` does); for the
segmenter the segmenter's (height, width).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD


class _Served(nn.Module):
    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", 255.0 * torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", 255.0 * torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))

    def inputs(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected RGB images (B, H, W, 3), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:  # the served signature is float32 (see pipeline.models.register_model)
            x = images.double()
            # an assertion inside the graph, not a Python branch on the values: MLflow serves the model as a
            # torch.export program, which keeps no data-dependent Python control flow
            torch._assert_async(
                ((x == x.round()) & (x >= 0) & (x <= 255)).all(),
                "expected RGB values as integers 0-255 (uint8 images); some are not: scaled to 0-1 or normalised?",
            )
        return (images.permute(0, 3, 1, 2).float() - self.mean) / self.std


class ServedEncoder(_Served):
    """Images -> (B, D) float32 features: the mean of the encoder's last-layer tokens (``avg_last``)."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.inputs(images)).float().mean(dim=1)


class ServedClassifier(_Served):
    """Images -> (B, K) float32 class probabilities (softmax of the finetuned classifier's logits)."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.inputs(images)).float().softmax(dim=1)


class ServedSegmenter(_Served):
    """Images -> (B, H, W) int64 class ids."""

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.inputs(images)).argmax(dim=1)


def served(kind: str, model: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> _Served:
    """``kind``: "encoder", "classifier" or "segmenter"; ``model`` is moved to the CPU and copied in eval mode."""
    import copy

    cls = {"encoder": ServedEncoder, "classifier": ServedClassifier, "segmenter": ServedSegmenter}[kind]
    return cls(copy.deepcopy(model).cpu().float(), mean, std)
