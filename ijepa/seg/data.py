"""Segmentation data: image/mask folders paired by file stem, colour-coded or index masks, joint augmentation.

Layout: ``DIR/images/<stem>.<ext>`` and ``DIR/masks/<stem>.png``. Masks are either
- ``color``: RGB PNGs decoded with a class config YAML in the sovit-fork format (``ALL_CLASSES``,
  ``LABEL_COLORS_LIST``, ``VIS_LABEL_MAP``; so its VOC configs work) plus our optional ``IGNORE_COLORS``
  (e.g. VOC's boundary colour [224, 224, 192]) mapped to the ignore index. Any other colour is *not* turned
  into background (the fork's bug): it becomes ignore and is counted and reported per file;
- ``index``: single-channel PNGs holding class ids, 255 = ignore (VOC ``SegmentationClass`` style after
  palette conversion; palette PNGs are read as their indices).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import yaml
from PIL import Image

from ..data.sources import IMAGE_EXTENSIONS
from ..data.workers import worker_context
from ..errors import ImageReadError, UserError
from ..images import check_pixels, read_bgr

IGNORE = 255


class SegDataError(UserError, ValueError):
    """Bad segmentation data; the message names the file or key."""


@dataclass(frozen=True)
class SegClasses:
    """Class names, the mask colour of each (colour masks) and the colour to draw each prediction."""

    names: tuple[str, ...]
    label_colors: tuple[tuple[int, int, int], ...]
    vis_colors: tuple[tuple[int, int, int], ...]
    ignore_colors: tuple[tuple[int, int, int], ...] = ()

    def to_dict(self) -> dict:
        return {
            "ALL_CLASSES": list(self.names),
            "LABEL_COLORS_LIST": [list(c) for c in self.label_colors],
            "VIS_LABEL_MAP": [list(c) for c in self.vis_colors],
            "IGNORE_COLORS": [list(c) for c in self.ignore_colors],
        }

    @classmethod
    def from_dict(cls, cfg: dict, where: str = "class config") -> SegClasses:
        if not isinstance(cfg, dict):
            raise SegDataError(f"{where}: expected a mapping with ALL_CLASSES, LABEL_COLORS_LIST, VIS_LABEL_MAP")
        missing = [k for k in ("ALL_CLASSES", "LABEL_COLORS_LIST") if k not in cfg]
        if missing:
            raise SegDataError(f"{where}: missing {', '.join(missing)}")
        names = cfg["ALL_CLASSES"]
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise SegDataError(f"{where}: ALL_CLASSES must be a non-empty list of names")
        if len(names) >= IGNORE:
            raise SegDataError(f"{where}: {len(names)} classes; at most {IGNORE - 1} (255 is the ignore index)")

        def colors(key: str, required: bool) -> tuple[tuple[int, int, int], ...]:
            value = cfg.get(key)
            if value is None and not required:
                return ()
            ok = isinstance(value, list) and all(
                isinstance(c, list | tuple) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
                for c in value
            )
            if not ok:
                raise SegDataError(f"{where}: {key} must be a list of [R, G, B] integers in 0..255")
            return tuple(tuple(c) for c in value)

        label = colors("LABEL_COLORS_LIST", True)
        vis = colors("VIS_LABEL_MAP", False) or label
        for key, value in (("LABEL_COLORS_LIST", label), ("VIS_LABEL_MAP", vis)):
            if len(value) != len(names):
                raise SegDataError(f"{where}: {key} has {len(value)} colours for {len(names)} classes")
        if len(set(label)) != len(label):
            raise SegDataError(f"{where}: LABEL_COLORS_LIST repeats a colour")
        ignore = colors("IGNORE_COLORS", False)
        if set(ignore) & set(label):
            raise SegDataError(f"{where}: IGNORE_COLORS overlaps LABEL_COLORS_LIST")
        return cls(tuple(names), label, vis, ignore)


def load_class_config(path: str | Path) -> SegClasses:
    """Read and validate a class config YAML."""
    path = Path(path)
    if not path.is_file():
        raise SegDataError(f"{path}: class config not found")
    try:
        cfg = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise SegDataError(f"{path}: not valid YAML: {e}") from e
    return SegClasses.from_dict(cfg, str(path))


def pair_files(folder: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs of ``folder/images`` and ``folder/masks`` matched by stem, sorted by stem.

    Raises:
        SegDataError naming every unpaired file (or a duplicated stem), or a missing folder.
    """
    folder = Path(folder)
    found = {}
    for sub in ("images", "masks"):
        d = folder / sub
        if not d.is_dir():
            raise SegDataError(f"{d}: folder not found (expected {folder}/images and {folder}/masks)")
        files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        stems = Counter(p.stem for p in files)
        dup = [s for s, n in stems.items() if n > 1]
        if dup:
            raise SegDataError(f"{d}: several files share the stem(s) {', '.join(sorted(dup)[:5])}")
        found[sub] = {p.stem: p for p in files}
    images, masks = found["images"], found["masks"]
    lonely = [str(images[s]) for s in sorted(images.keys() - masks.keys())]
    lonely += [str(masks[s]) for s in sorted(masks.keys() - images.keys())]
    if lonely:
        shown = ", ".join(lonely[:10]) + (f" and {len(lonely) - 10} more" if len(lonely) > 10 else "")
        raise SegDataError(f"{len(lonely)} unpaired file(s) (no image or mask with the same stem): {shown}")
    if not images:
        raise SegDataError(f"{folder}: no image/mask pairs")
    return [(images[s], masks[s]) for s in sorted(images)]


def decode_color_mask(rgb: np.ndarray, classes: SegClasses) -> tuple[np.ndarray, Counter]:
    """(H, W, 3) RGB uint8 -> (H, W) uint8 class ids; ignore colours and unknown colours -> 255.

    Returns:
        (ids, unknown) where ``unknown`` counts pixels per colour that is neither a class nor ignored.
    """
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise SegDataError(f"colour mask must be (H, W, 3), got {rgb.shape}")
    code = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
    lut_keys = np.array([(r << 16) | (g << 8) | b for r, g, b in classes.label_colors], np.int32)
    out = np.full(code.shape, IGNORE, np.uint8)
    known = np.zeros(code.shape, bool)
    for i, key in enumerate(lut_keys):
        hit = code == key
        out[hit] = i
        known |= hit
    for r, g, b in classes.ignore_colors:
        known |= code == ((r << 16) | (g << 8) | b)
    unknown = Counter()
    if not known.all():
        values, counts = np.unique(code[~known], return_counts=True)
        unknown.update(
            {(int(v) >> 16, (int(v) >> 8) & 255, int(v) & 255): int(c) for v, c in zip(values, counts, strict=True)}
        )
    return out, unknown


def read_mask(path: Path, fmt: str, classes: SegClasses) -> tuple[np.ndarray, Counter]:
    """A mask file as (H, W) uint8 ids (255 = ignore) and its unknown-colour counts."""
    try:
        check_pixels(path)  # refuse a mask bomb before decoding it
    except ImageReadError as e:
        raise SegDataError(str(e)) from None
    try:
        with Image.open(path) as im:
            if fmt == "color":
                arr = np.asarray(im.convert("RGB"))
                return decode_color_mask(arr, classes)
            if fmt != "index":
                raise SegDataError(f"mask format must be 'color' or 'index', got {fmt!r}")
            if im.mode not in ("L", "P", "I", "I;16"):
                raise SegDataError(f"{path}: index masks must be single-channel (mode L or P), got mode {im.mode}")
            ids = np.asarray(im).astype(np.int64)
    except SegDataError:  # raised above with its own message (it is a ValueError too)
        raise
    except (OSError, SyntaxError, ValueError) as e:
        raise SegDataError(f"{path}: cannot read mask ({type(e).__name__}: {e})") from None
    bad = (ids >= len(classes.names)) & (ids != IGNORE)
    counts = Counter()
    if bad.any():
        values, n = np.unique(ids[bad], return_counts=True)
        counts.update({f"id {int(v)}": int(c) for v, c in zip(values, n, strict=True)})
    ids = np.where(bad, IGNORE, ids).astype(np.uint8)
    return ids, counts


def read_image_bgr(path: Path) -> np.ndarray:
    """An image of a segmentation folder as BGR uint8; refused (SegDataError) when undecodable or above the
    commands' pixel limit (checked on the header before decoding)."""
    try:
        return read_bgr(path)
    except ImageReadError as e:
        raise SegDataError(str(e)) from None


class SegDataset(torch.utils.data.Dataset):
    """Pairs of one folder as (image uint8 (H, W, 3) BGR, mask uint8 (h, w)) at the model's input size.

    Training (``train=True``): random scale in ``scale`` of the input size, random crop (padded with
    ignore where the scaled image is smaller), horizontal flip, applied identically to image and mask
    (nearest for masks). Evaluation: the image is resized to ``size`` and the mask kept at its original
    resolution (metrics are computed there, predictions are upsampled to it).
    """

    def __init__(
        self,
        folder: str | Path,
        classes: SegClasses,
        fmt: str,
        size: tuple[int, int],
        *,
        train: bool,
        scale: tuple[float, float] = (0.5, 2.0),
        hflip: bool = True,
        seed: int = 0,
    ):
        self.pairs = pair_files(folder)
        self.classes, self.fmt, self.size, self.train = classes, fmt, tuple(size), train
        self.scale, self.hflip, self.seed, self.epoch = tuple(scale), hflip, seed, 0
        self.unknown: Counter = Counter()  # filled by scan_masks

    def scan_masks(self) -> dict:
        """Decode every mask once: unknown colours per file and in total, class pixel counts."""
        per_file, pixels = {}, np.zeros(len(self.classes.names) + 1, np.int64)
        for _, mpath in self.pairs:
            ids, unknown = read_mask(mpath, self.fmt, self.classes)
            if unknown:
                per_file[str(mpath)] = sum(unknown.values())
                self.unknown.update(unknown)
            pixels += np.bincount(np.minimum(ids.ravel(), len(self.classes.names)), minlength=len(pixels))
        return {
            "unknown_pixels": int(sum(self.unknown.values())),
            "unknown_files": per_file,
            "unknown_colors": {str(k): v for k, v in self.unknown.most_common(10)},
            "class_pixels": {n: int(c) for n, c in zip([*self.classes.names, "ignore"], pixels, strict=True)},
        }

    def __len__(self) -> int:
        return len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, i: int):
        ipath, mpath = self.pairs[i]
        img = read_image_bgr(ipath)
        mask, _ = read_mask(mpath, self.fmt, self.classes)
        if img.shape[:2] != mask.shape:
            raise SegDataError(
                f"{ipath} is {img.shape[1]}x{img.shape[0]} but {mpath} is {mask.shape[1]}x{mask.shape[0]}"
            )
        h, w = self.size
        if not self.train:
            return cv2.resize(img, (w, h), interpolation=cv2.INTER_LINEAR), mask
        rng = random.Random(hash((self.seed, self.epoch, i)))
        return joint_augment(img, mask, (h, w), rng, self.scale, self.hflip)


def joint_augment(img, mask, size, rng: random.Random, scale, hflip: bool):
    """Random rescale (relative to ``size``), random crop with ignore padding, optional flip."""
    h, w = size
    s = rng.uniform(*scale) * max(h / img.shape[0], w / img.shape[1])  # 1.0 = just covers the crop
    nh, nw = max(1, round(img.shape[0] * s)), max(1, round(img.shape[1] * s))
    img = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_LINEAR)
    mask = cv2.resize(mask, (nw, nh), interpolation=cv2.INTER_NEAREST)
    ph, pw = max(h - nh, 0), max(w - nw, 0)
    if ph or pw:
        img = cv2.copyMakeBorder(img, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=0)
        mask = cv2.copyMakeBorder(mask, 0, ph, 0, pw, cv2.BORDER_CONSTANT, value=IGNORE)
    y = rng.randint(0, img.shape[0] - h)
    x = rng.randint(0, img.shape[1] - w)
    img, mask = img[y : y + h, x : x + w], mask[y : y + h, x : x + w]
    if hflip and rng.random() < 0.5:
        img, mask = img[:, ::-1], mask[:, ::-1]
    return np.ascontiguousarray(img), np.ascontiguousarray(mask)


def collate_train(batch):
    imgs = torch.from_numpy(np.stack([b[0] for b in batch]))
    masks = torch.from_numpy(np.stack([b[1] for b in batch])).long()
    return imgs, masks


def collate_eval(batch):
    """Images stack (same input size); masks stay a list (each at its original resolution)."""
    return torch.from_numpy(np.stack([b[0] for b in batch])), [torch.from_numpy(b[1]).long() for b in batch]


def seg_loader(
    ds: SegDataset, batch_size: int, workers: int, train: bool, seed: int, rank: int = 0, world_size: int = 1
) -> torch.utils.data.DataLoader:
    """Training: a seeded permutation per epoch (``set_epoch``), cut into ``world_size`` disjoint shares
    (DistributedSampler: the union of the ranks' i-th batches is one process's i-th batch of the same size
    times world_size). Evaluation: every image once, in order (one process)."""
    sampler = None
    if train:
        sampler = torch.utils.data.DistributedSampler(
            ds, num_replicas=world_size, rank=rank, shuffle=True, seed=seed, drop_last=True
        )
    return torch.utils.data.DataLoader(
        ds,
        batch_size=batch_size,
        sampler=sampler,
        drop_last=train and len(ds) // world_size >= batch_size,
        num_workers=workers,
        collate_fn=collate_train if train else collate_eval,
        persistent_workers=False,
        multiprocessing_context=worker_context() if workers else None,  # fork-safe: see worker_context
    )
