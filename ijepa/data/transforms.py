"""Images from shard bytes to model input: decoding (OpenCV, simplejpeg), resizing, the pretraining and
evaluation transforms, batching into uint8 BGR arrays, and normalisation into the model's float RGB input.

The loaders (``ijepa.data.loaders``) run these in their workers; inference, serving and the in-memory path
run them in-process.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Sequence

import cv2
import numpy as np
import simplejpeg
import torch

from .tario import ShardError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_array(data: bytes, where: str = "sample") -> np.ndarray:
    """JPEG/PNG bytes -> (H, W, 3) uint8 array in OpenCV's BGR order (grey replicated to 3 channels).

    JPEGs go through simplejpeg (libjpeg-turbo's TurboJPEG API, straight into BGR: 14% faster than
    ``cv2.imdecode`` on 384x288 JPEGs, on par at 500x375, ``benchmarks/bench_data.py``); anything it
    refuses, and PNGs, through OpenCV."""
    if data[:2] == b"\xff\xd8":
        try:
            return simplejpeg.decode_jpeg(data, colorspace="BGR")
        except ValueError:
            pass  # e.g. a CMYK or 12-bit JPEG: OpenCV decodes it or reports it below
    arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    if arr is None:
        raise ShardError(f"cannot decode the image of {where}")
    return arr


def decode_image(data: bytes, where: str = "sample") -> torch.Tensor:
    """JPEG/PNG bytes -> (3, H, W) uint8 RGB tensor (grey replicated to 3 channels)."""
    return torch.from_numpy(np.ascontiguousarray(decode_array(data, where)[:, :, ::-1].transpose(2, 0, 1)))


def halve(src: np.ndarray, axis: int | None) -> np.ndarray:
    """Half the size along ``axis`` (None: both), each output pixel the mean of the 2 (or 2 x 2) it covers;
    an odd last row or column is dropped."""
    sh, sw = src.shape[:2]
    if axis is None:  # OpenCV's INTER_AREA has a fast path for exactly 2 x 2
        return cv2.resize(src[: sh // 2 * 2, : sw // 2 * 2], (sw // 2, sh // 2), interpolation=cv2.INTER_AREA)
    # bilinear at exactly half samples midway between two pixels: their mean (INTER_AREA has no fast path
    # for a 2 x 1 reduction)
    if axis == 1:
        return cv2.resize(src[:, : sw // 2 * 2], (sw // 2, sh), interpolation=cv2.INTER_LINEAR)
    return cv2.resize(src[: sh // 2 * 2], (sw, sh // 2), interpolation=cv2.INTER_LINEAR)


def resize_into(src: np.ndarray, dst: np.ndarray) -> None:
    # Bilinear, after halving the source (pixel means) while it is 2x or more the output along an axis, as
    # bilinear alone would alias there (below 2x it reads every source pixel anyway); PIL's reducing_gap
    # does the same. OpenCV's INTER_AREA gives close results but costs 6x bilinear over the crops of a
    # 500x375 image (benchmarks/bench_data.py); ImageNet crops reach 2x whenever they are 448 px wide.
    h, w = dst.shape[:2]
    while src.shape[0] >= 2 * h and src.shape[1] >= 2 * w:
        src = halve(src, None)
    while src.shape[1] >= 2 * w:
        src = halve(src, 1)
    while src.shape[0] >= 2 * h:
        src = halve(src, 0)
    cv2.resize(src, (w, h), dst=dst, interpolation=cv2.INTER_LINEAR)


class PretrainTransform:
    """Upstream's ``make_transforms`` for one image, written into a batch slot.

    RandomResizedCrop(crop_size, scale=crop_scale, ratio 3/4-4/3) with torchvision's sampling rule, optional
    horizontal flip, colour distortion (ColorJitter(0.8s, 0.8s, 0.8s, 0.2s) with p 0.8 plus RandomGrayscale
    0.2) and Gaussian blur (p 0.5, sigma 0.1-2); for finetuning, ``augment.TimmRandAugment(rand_augment)``.
    Normalisation is ``Normalize``'s job, on the batch.
    Crop and flip draw from the ``random.Random`` handed in (seeded per worker by the loaders); colour and
    blur use the torch RNG (seeded per worker too).
    """

    def __init__(
        self,
        crop_size: int,
        crop_scale: Sequence[float] = (0.3, 1.0),
        horizontal_flip: bool = False,
        color_distortion: bool = False,
        color_jitter: float = 1.0,
        gaussian_blur: bool = False,
        rand_augment: int = 0,
    ):
        if not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"crop_scale must satisfy 0 < min <= max <= 1, got {list(crop_scale)}")
        self.crop_size, self.crop_scale, self.flip = int(crop_size), tuple(crop_scale), bool(horizontal_flip)
        self._extra = None
        if color_distortion or gaussian_blur or rand_augment:  # torchvision only then (2 s to import)
            from .augment import extra_transforms

            self._extra = extra_transforms(crop_size, color_distortion, color_jitter, gaussian_blur, rand_augment)

    def crop_params(self, rng: random.Random, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop rule: 10 tries of area x log-uniform ratio, else a centre crop."""
        area = height * width
        lo, hi = math.log(3 / 4), math.log(4 / 3)
        for _ in range(10):
            target = area * rng.uniform(*self.crop_scale)
            ratio = math.exp(rng.uniform(lo, hi))
            w = round(math.sqrt(target * ratio))
            h = round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                return rng.randint(0, height - h), rng.randint(0, width - w), h, w
        ratio = width / height
        if ratio < 3 / 4:
            w, h = width, round(width / (3 / 4))
        elif ratio > 4 / 3:
            h, w = height, round(height * (4 / 3))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def apply(self, arr: np.ndarray, out: np.ndarray, rng: random.Random) -> None:
        """Write the transformed ``arr`` (H, W, 3) into ``out`` (S, S, 3); both BGR uint8."""
        top, left, h, w = self.crop_params(rng, arr.shape[0], arr.shape[1])
        resize_into(arr[top : top + h, left : left + w], out)
        if self.flip and rng.random() < 0.5:
            cv2.flip(out, 1, dst=out)
        if self._extra is not None:
            rgb = torch.from_numpy(np.ascontiguousarray(out[:, :, ::-1].transpose(2, 0, 1)))
            out[...] = self._extra(rgb).permute(1, 2, 0).numpy()[:, :, ::-1]


class EvalTransform:
    """Deterministic: resize the short side to ``resize_size`` (default crop_size), centre-crop to
    ``crop_size`` (written into a batch slot)."""

    def __init__(self, crop_size: int, resize_size: int | None = None):
        self.crop_size, self.resize_size = int(crop_size), int(resize_size or crop_size)

    def apply(self, arr: np.ndarray, out: np.ndarray, rng: random.Random | None = None) -> None:
        h, w = arr.shape[:2]
        scale = self.resize_size / min(h, w)
        nh, nw = max(self.crop_size, round(h * scale)), max(self.crop_size, round(w * scale))
        resized = np.empty((nh, nw, 3), np.uint8)
        resize_into(arr, resized)
        top, left = (nh - self.crop_size) // 2, (nw - self.crop_size) // 2
        out[...] = resized[top : top + self.crop_size, left : left + self.crop_size]


def pretrain_transform(crop_size: int, **kwargs) -> PretrainTransform:
    """``PretrainTransform(crop_size, **kwargs)``."""
    return PretrainTransform(crop_size, **kwargs)


def eval_transform(crop_size: int, resize_size: int | None = None) -> EvalTransform:
    """``EvalTransform(crop_size, resize_size)``."""
    return EvalTransform(crop_size, resize_size)


def build_batch(
    arrays: Iterable[np.ndarray],
    transform,
    rng: random.Random | None = None,
    out: torch.Tensor | None = None,
    count: int | None = None,
) -> torch.Tensor:
    """Transform decoded BGR images into one uint8 (B, S, S, 3) batch, written into ``out`` when given
    (a ``BatchSlots`` buffer of that shape in a loader worker), else into a new tensor. ``arrays`` may be an
    iterator of ``count`` images."""
    s = transform.crop_size
    shape = (len(arrays) if count is None else count, s, s, 3)
    if out is None:
        out = torch.empty(shape, dtype=torch.uint8)
    elif tuple(out.shape) != shape or out.dtype != torch.uint8:
        raise ValueError(f"batch buffer is {tuple(out.shape)} {out.dtype}, the batch needs {shape} uint8")
    view = out.numpy()
    for i, arr in enumerate(arrays):
        transform.apply(arr, view[i], rng)
    return out


class Normalize:
    """uint8 BGR (B, H, W, 3) batches -> float32 RGB (B, 3, H, W), normalised (ImageNet statistics by default).

    Runs on ``device`` (the GPU in training), where the layout change and normalisation are cheap.
    """

    def __init__(self, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD):
        self.mean = [255.0 * m for m in mean]
        self.std = [255.0 * s for s in std]

    def __call__(self, x: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        x = x.to(device, non_blocking=True) if device is not None else x
        b, h, w, _ = x.shape
        out = torch.empty((b, 3, h, w), dtype=torch.float32, device=x.device)
        for c in range(3):  # RGB channel c is BGR channel 2 - c; in place per plane (cheapest on CPU)
            out[:, c].copy_(x[..., 2 - c]).sub_(self.mean[c]).div_(self.std[c])
        return out


def to_rgb_uint8(batch: torch.Tensor) -> torch.Tensor:
    """A loader batch (B, H, W, 3) BGR -> (B, 3, H, W) RGB uint8 (for pictures and tests)."""
    return batch.flip(-1).permute(0, 3, 1, 2).contiguous()
