"""Data loading: WebDataset shards vs torchvision ImageFolder on the same JPEGs and transforms, and raw decode.

Builds an ImageFolder of real images (Fashion-MNIST items, colour-tinted and upscaled to 384x288
JPEGs, quality 90), prepares shards from it with ``ijepa.data.prepare_image_folder`` (JPEGs stored
unchanged), then times, with 2 worker processes each and the pretraining transform (RandomResizedCrop 224,
flip, normalise):
  - torchvision ``ImageFolder`` (PIL decode) + DataLoader, shuffled;
  - ``ijepa.data.pretrain_loader`` over the shards (cv2 decode and crop in uint8, resampled shards, shuffle
    buffer), normalised to float in the consuming process (as the trainer does, on its device);
  - raw JPEG decoding alone (cv2, 2 processes, no transform) as the ceiling.
Prints images/s (median over epochs) and the ratios.

    python benchmarks/bench_data.py [--images 3000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from ijepa.data import find_fashion_mnist, prepare_image_folder, pretrain_loader, pretrain_transform
from ijepa.data.loaders import IMAGENET_MEAN, IMAGENET_STD, Normalize
from ijepa.data.sources import read_fashion_mnist

SIZE, CROP, BATCH, WORKERS = (384, 288), 224, 64, 2  # (width, height): ImageNet-like 4:3


def build_folder(root: Path, n: int) -> None:
    images, labels = read_fashion_mnist(find_fashion_mnist(None), "train")
    rng = np.random.default_rng(0)
    for i in range(n):
        grey = cv2.resize(images[i], SIZE, interpolation=cv2.INTER_CUBIC).astype(np.float32)
        tint = rng.uniform(0.4, 1.0, 3)
        noise = rng.normal(0, 8, (SIZE[1], SIZE[0], 3))
        rgb = np.clip(grey[..., None] * tint + noise, 0, 255).astype(np.uint8)
        folder = root / f"class_{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:06d}.jpg", quality=90)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def rate(loader, epochs: int, normalize=None) -> float:
    """Images per second; ``normalize`` runs on each batch in this process (the shards' consumer side)."""
    rates = []
    for _ in range(epochs):
        t0, seen = time.perf_counter(), 0
        for imgs, _ in loader:
            if normalize is not None:
                imgs = normalize(imgs)
            seen += len(imgs)
        rates.append(seen / (time.perf_counter() - t0))
    return statistics.median(rates)


def _decode(path: str) -> int:
    cv2.setNumThreads(1)
    arr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    return arr.shape[0]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        build_folder(root, args.images)
        prepare_image_folder(root, shards, val_fraction=0.0, shard_size=250, workers=2, progress=False)
        urls = sorted(str(p) for p in (shards / "train").glob("*.tar"))
        files = sorted(str(p) for p in root.rglob("*.jpg"))
        n = len(files)
        print(
            f"{n} JPEGs {SIZE[0]}x{SIZE[1]} (mean {np.mean([Path(f).stat().st_size for f in files]) / 1024:.1f} KiB), "
            f"{len(urls)} shards, batch {BATCH}, {WORKERS} workers, RandomResizedCrop {CROP} + flip + normalise"
        )

        pil_tf = v2.Compose(
            [
                v2.RandomResizedCrop(CROP, scale=(0.3, 1.0)),
                v2.RandomHorizontalFlip(),
                v2.PILToTensor(),
                v2.ToDtype(torch.float32, scale=True),
                v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
            ]
        )
        folder = DataLoader(
            datasets.ImageFolder(str(root), transform=pil_tf),
            batch_size=BATCH,
            shuffle=True,
            num_workers=WORKERS,
            worker_init_fn=_init_worker,
            drop_last=True,
        )
        r_folder = rate(folder, args.epochs)

        def shard_epochs():
            for ep in range(args.epochs):
                yield pretrain_loader(
                    urls,
                    batch_size=BATCH,
                    collator=None,
                    transform=pretrain_transform(CROP, horizontal_flip=True),
                    batches_per_epoch=n // BATCH,
                    epoch=ep,
                    num_workers=WORKERS,
                )

        norm = Normalize()
        r_shards = statistics.median(rate(loader, 1, norm) for loader in shard_epochs())
        r_shards_u8 = statistics.median(rate(loader, 1) for loader in shard_epochs())

        with mp.get_context("fork").Pool(WORKERS) as pool:
            decode_rates = []
            for _ in range(args.epochs):
                t0 = time.perf_counter()
                pool.map(_decode, files, chunksize=64)
                decode_rates.append(n / (time.perf_counter() - t0))
        r_decode = statistics.median(decode_rates)

    print(f"torchvision ImageFolder (PIL)       {r_folder:8.0f} images/s")
    print(f"ijepa shards (WebDataset, cv2)      {r_shards:8.0f} images/s")
    print(f"  same, uint8 batches, normalisation left to the trainer's device  {r_shards_u8:8.0f} images/s")
    print(f"raw JPEG decode only (cv2)          {r_decode:8.0f} images/s")
    print(
        f"shards / ImageFolder = {r_shards / r_folder:.2f}x (goal >= 1.5x); "
        f"shards / raw decode = {100 * r_shards / r_decode:.0f}% (goal >= 80%)"
    )


if __name__ == "__main__":
    main()
