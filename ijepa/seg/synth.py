"""Demo segmentation scenes: Fashion-MNIST items alpha-blended onto darkened grey crops of real photographs.

The backgrounds are the images that ship inside scikit-image (``skimage.data``) and scikit-learn
(``load_sample_images``), so nothing is downloaded. Train and val scenes use disjoint background pools
and disjoint Fashion-MNIST splits (train items on train scenes, test items on val scenes). Every scene is a
pure function of (seed, split, index). Output is the colour-mask folder format that real data uses.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import yaml
from scipy import ndimage
from tqdm import tqdm

from ..data.sources import FASHION_MNIST_CLASSES, read_fashion_mnist

# disjoint pools (the skimage "cat" and "chelsea" are the same photograph: only one is used)
TRAIN_BACKGROUNDS = (
    "skimage:astronaut", "skimage:brick", "skimage:camera", "skimage:coffee", "skimage:grass", "skimage:gravel",
    "skimage:moon", "skimage:rocket", "skimage:immunohistochemistry", "skimage:page", "sklearn:china.jpg",
)  # fmt: skip
VAL_BACKGROUNDS = (
    "skimage:chelsea", "skimage:coins", "skimage:hubble_deep_field", "skimage:retina", "skimage:text",
    "skimage:clock", "skimage:cell", "sklearn:flower.jpg",
)  # fmt: skip
BOUNDARY = (224, 224, 192)  # VOC's boundary colour: pixels whose blend is ambiguous, ignored in training and eval


def voc_palette(n: int) -> list[list[int]]:
    """The PASCAL VOC colour map (bit-interleaved), first ``n`` entries."""
    out = []
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out.append([r, g, b])
    return out


def class_config() -> dict:
    names = ["background", *(n.lower() for n in FASHION_MNIST_CLASSES)]
    colors = voc_palette(len(names))
    return {
        "ALL_CLASSES": names,
        "LABEL_COLORS_LIST": colors,
        "VIS_LABEL_MAP": colors,
        "IGNORE_COLORS": [list(BOUNDARY)],
    }


def load_background(name: str) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a packaged image ``skimage:<function>`` or ``sklearn:<file>``."""
    kind, key = name.split(":", 1)
    if kind == "skimage":
        import skimage.data

        img = getattr(skimage.data, key)()
    elif kind == "sklearn":
        from sklearn.datasets import load_sample_image

        img = load_sample_image(key)
    else:
        raise ValueError(f"unknown background source {name!r}")
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = (255 * (img.astype(np.float64) / max(float(img.max()), 1e-8))).astype(np.uint8)
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])


def make_scene(
    rng: np.random.Generator,
    backgrounds: list[np.ndarray],
    items: np.ndarray,
    labels: np.ndarray,
    size: tuple[int, int],
    n_items: tuple[int, int],
    item_scale: tuple[float, float],
) -> tuple[np.ndarray, np.ndarray]:
    """One scene: (H, W, 3) RGB image and (H, W, 3) RGB colour mask.

    The recipe of ``shared/reference/datasets.md`` section 5: a grey crop of a real photo, darkened
    (x0.15-0.5) with random contrast, so items keep the bright-on-dark look of Fashion-MNIST; items pasted
    with soft alpha ``clip(item / 12, 0, 1)`` (no dark outline to cheat on) and a random gain; the label of an
    item is ``fill_holes(closing(item > 12))``, so its dark interior still belongs to it; a one-pixel ring
    outside each item is the ignored boundary; later items cover earlier ones.
    """
    h, w = size
    bg = backgrounds[rng.integers(len(backgrounds))]
    zoom = rng.uniform(1.0, min(bg.shape[0] / h, bg.shape[1] / w))
    ch, cw = int(h * zoom), int(w * zoom)
    y, x = rng.integers(0, bg.shape[0] - ch + 1), rng.integers(0, bg.shape[1] - cw + 1)
    crop = cv2.resize(bg[y : y + ch, x : x + cw], (w, h), interpolation=cv2.INTER_AREA)
    grey = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY).astype(np.float32)
    contrast = rng.uniform(0.6, 1.4)
    img = np.clip((grey - grey.mean()) * contrast + grey.mean(), 0, 255) * rng.uniform(0.15, 0.5)
    ids = np.zeros((h, w), np.int64)
    for _ in range(rng.integers(n_items[0], n_items[1] + 1)):
        k = rng.integers(len(items))
        s = round(28 * rng.uniform(*item_scale))
        item = cv2.resize(items[k], (s, s), interpolation=cv2.INTER_LINEAR).astype(np.float32)
        iy, ix = rng.integers(0, h - s + 1), rng.integers(0, w - s + 1)
        alpha = np.clip(item / 12.0, 0.0, 1.0)
        region = img[iy : iy + s, ix : ix + s]
        region[:] = region * (1 - alpha) + item * rng.uniform(0.7, 1.0) * alpha
        solid = ndimage.binary_fill_holes(ndimage.binary_closing(item > 12, iterations=1))
        ring = ndimage.binary_dilation(solid) & ~solid
        sub = ids[iy : iy + s, ix : ix + s]
        sub[ring] = -1  # boundary (ignored), unless a later item covers it
        sub[solid] = int(labels[k]) + 1
    colors = np.asarray(class_config()["LABEL_COLORS_LIST"], np.uint8)
    mask = np.where(ids[..., None] >= 0, colors[np.clip(ids, 0, None)], np.asarray(BOUNDARY, np.uint8))
    img = np.repeat(np.clip(img, 0, 255).round().astype(np.uint8)[..., None], 3, axis=2)
    return img, mask.astype(np.uint8)


def generate_scenes(
    out_dir: str | Path,
    fashion_mnist_dir: Path,
    *,
    n_train: int,
    n_val: int,
    size: tuple[int, int],
    n_items: tuple[int, int] = (1, 3),
    item_scale: tuple[float, float] = (1.0, 1.6),
    seed: int = 0,
) -> dict:
    """Write ``out_dir/{train,val}/{images,masks}/<stem>.png`` and ``out_dir/classes.yaml``.

    Returns:
        a manifest: counts, size, background pools, class pixel fractions per split.
    """
    out = Path(out_dir)
    h, w = size
    manifest = {"size": [h, w], "seed": seed, "splits": {}}
    for split, n, pool, fm_split, split_id in (
        ("train", n_train, TRAIN_BACKGROUNDS, "train", 0),
        ("val", n_val, VAL_BACKGROUNDS, "test", 1),
    ):
        backgrounds = [load_background(b) for b in pool]
        small = [b for b, img in zip(pool, backgrounds, strict=True) if img.shape[0] < h or img.shape[1] < w]
        if small:
            raise ValueError(f"backgrounds {small} are smaller than the scene size {h}x{w}")
        items, labels = read_fashion_mnist(fashion_mnist_dir, fm_split)
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in tqdm(range(n), desc=f"seg_prepare {split}", mininterval=2):
            rng = np.random.default_rng([seed, split_id, i])
            img, mask = make_scene(rng, backgrounds, items, labels, size, n_items, item_scale)
            stem = f"{split}_{i:05d}"
            cv2.imwrite(str(out / split / "images" / f"{stem}.png"), img[..., ::-1])
            cv2.imwrite(str(out / split / "masks" / f"{stem}.png"), mask[..., ::-1])
        manifest["splits"][split] = {"count": n, "backgrounds": list(pool), "fashion_mnist_split": fm_split}
    (out / "classes.yaml").write_text(yaml.safe_dump(class_config(), sort_keys=False))
    return manifest
