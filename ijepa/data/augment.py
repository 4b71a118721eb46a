"""Augmentations on torchvision's v2 ops, imported only by transforms that use them (importing torchvision
costs about 2 s, which every stage and command that never augments would pay at start-up)."""

from __future__ import annotations

import math

import torch
from torchvision.transforms import v2


def extra_transforms(
    crop_size: int, color_distortion: bool, color_jitter: float, gaussian_blur: bool, rand_augment: int
) -> v2.Compose | None:
    """``PretrainTransform``'s ops after the crop: upstream's colour distortion (ColorJitter(0.8s, 0.8s, 0.8s,
    0.2s) with p 0.8, RandomGrayscale 0.2) and Gaussian blur (p 0.5, sigma 0.1-2), and for finetuning
    ``TimmRandAugment(rand_augment)``; None when all are off."""
    extra: list = []
    if color_distortion:
        s = color_jitter
        extra += [
            v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
            v2.RandomGrayscale(0.2),
        ]
    if gaussian_blur:
        extra.append(v2.RandomApply([v2.GaussianBlur(max(3, (crop_size // 10) | 1), sigma=(0.1, 2.0))], p=0.5))
    if rand_augment:
        extra.append(TimmRandAugment(rand_augment))  # finetuning (MAE recipe: rand-m9-mstd0.5-inc1)
    return v2.Compose(extra) if extra else None


class TimmRandAugment(v2.RandAugment):
    """timm's ``rand-m{M}-mstd0.5`` (MAE's finetuning recipe uses M = 9) on torchvision's RandAugment ops.

    timm's magnitude M is on a 0-10 scale: an op runs at M / 10 of its range (rotate up to 30 degrees,
    shear 0.3, translate 0.45 of the side, colour/contrast/brightness/sharpness factors 1 +- 0.9). torchvision's
    ``RandAugment(magnitude=9)`` indexes 31 bins, i.e. 9 / 30 of the range: a third of timm's strength. Here
    the magnitude is drawn per image from N(M, ``std``) clipped to [0, 10] (timm's mstd; timm draws per op)
    and mapped onto 101 bins, so an op runs at M / 10 of torchvision's range, which matches timm's maxima.
    torchvision's posterize and solarize already grow stronger with the magnitude, like timm's "inc1" set.
    Draws use the torch RNG.
    """

    def __init__(self, magnitude: float, std: float = 0.5, num_ops: int = 2):
        if not 0 <= magnitude <= 10:
            raise ValueError(f"RandAugment magnitude is on timm's 0-10 scale, got {magnitude}")
        super().__init__(num_ops=num_ops, magnitude=0, num_magnitude_bins=101)
        self.level, self.std = float(magnitude), float(std)

    def forward(self, *inputs):
        m = self.level + self.std * float(torch.randn(())) if self.std > 0 else self.level
        self.magnitude = round(min(max(m, 0.0), 10.0) * 10)  # bin of 101: fraction m / 10 of the range
        return super().forward(*inputs)


def random_erasing(x: torch.Tensor, p: float) -> torch.Tensor:
    """timm's RandomErasing as MAE finetunes with it (``reprob`` p, mode "pixel", one box): per image, with
    probability ``p``, a box of 2-33% of the area and aspect ratio 0.3-3.3 is filled with standard-normal
    noise, on the normalised (B, 3, H, W) batch, in place. Draws use the torch RNG (on the CPU)."""
    if p <= 0:
        return x
    b, _, h, w = x.shape
    for i in torch.nonzero(torch.rand(b) < p).flatten().tolist():
        for _ in range(10):  # torchvision's rule: 10 tries of area x log-uniform ratio
            area = h * w * float(torch.empty(()).uniform_(0.02, 1 / 3))
            ratio = math.exp(float(torch.empty(()).uniform_(math.log(0.3), math.log(1 / 0.3))))
            eh, ew = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < eh < h and 0 < ew < w:
                top, left = int(torch.randint(0, h - eh + 1, ())), int(torch.randint(0, w - ew + 1, ()))
                noise = torch.randn((x.shape[1], eh, ew)).to(x.device, x.dtype)
                x[i, :, top : top + eh, left : left + ew] = noise
                break
    return x
