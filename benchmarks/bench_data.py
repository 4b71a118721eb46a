"""Data loading: WebDataset shards vs torchvision ImageFolder on the same JPEGs and transforms, and raw decode.

Builds an ImageFolder of real images (Fashion-MNIST items, colour-tinted and upscaled to 384x288
JPEGs, quality 90), prepares shards from it with ``ijepa.data.prepare_image_folder`` (JPEGs stored
unchanged), then times, with 2 worker processes each and the pretraining transform (RandomResizedCrop 224,
flip, normalise):
  - torchvision ``ImageFolder`` (PIL decode) + DataLoader, shuffled;
  - ``ijepa.data.pretrain_loader`` over the shards (tar headers parsed by ``ijepa.data.tario``, JPEG decode
    by ``decode_array``, crop in uint8, resampled shards, shuffle buffer), once normalised to float in the
    consuming process and once left as uint8 (the trainer normalises on its device);
  - raw JPEG decoding alone with the loader's ``decode_array`` (and with ``cv2.imdecode``), no transform,
    as the ceiling.
The shard loader and the raw decode are also timed with 1, 2 and 4 processes (worker scaling), and reading
the shards' samples without decoding with webdataset's tar reader and with ``ijepa.data.tario``.
Prints images/s (median over epochs) and the ratios.

    python benchmarks/bench_data.py [--images 3000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import functools
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision.transforms import v2

from ijepa.data import find_fashion_mnist, prepare_image_folder, pretrain_loader, pretrain_transform
from ijepa.data.loaders import IMAGENET_MEAN, IMAGENET_STD, Normalize, decode_array
from ijepa.data.sources import read_fashion_mnist
from ijepa.data.tario import tar_samples

SIZE, CROP, BATCH, WORKERS = (384, 288), 224, 64, 2  # (width, height): ImageNet-like 4:3
SCALING = (1, 2, 4)  # worker processes for the scaling table


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


def _cv2_decode(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)


def _decode_file(path: str, decode) -> int:
    cv2.setNumThreads(1)
    return decode(Path(path).read_bytes()).shape[0]


def parse_us(samples, n: int, repeats: int = 3) -> float:
    """Microseconds per sample to read every sample of the shards (no decode), median of ``repeats``."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        count = sum(1 for _ in samples())
        times.append((time.perf_counter() - t0) / count * 1e6)
        assert count == n
    return statistics.median(times)


def decode_rate(files: list[str], decode, processes: int, epochs: int) -> float:
    """Images per second decoding every file in ``processes`` processes (no transform, no batching)."""
    rates = []
    with mp.get_context("fork").Pool(processes) as pool:
        for _ in range(epochs):
            t0 = time.perf_counter()
            pool.map(functools.partial(_decode_file, decode=decode), files, chunksize=64)
            rates.append(len(files) / (time.perf_counter() - t0))
    return statistics.median(rates)


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

        def shard_epochs(workers: int):
            for ep in range(args.epochs):
                yield pretrain_loader(
                    urls,
                    batch_size=BATCH,
                    collator=None,
                    transform=pretrain_transform(CROP, horizontal_flip=True),
                    batches_per_epoch=n // BATCH,
                    epoch=ep,
                    num_workers=workers,
                )

        norm = Normalize()
        r_shards = statistics.median(rate(loader, 1, norm) for loader in shard_epochs(WORKERS))
        r_u8 = {w: statistics.median(rate(loader, 1) for loader in shard_epochs(w)) for w in SCALING}
        r_decode = {w: decode_rate(files, decode_array, w, args.epochs) for w in SCALING}
        r_cv2 = decode_rate(files, _cv2_decode, WORKERS, args.epochs)
        tar_us = {
            "webdataset.tarfile_to_samples (Python tarfile)": parse_us(
                lambda: wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([{"url": u} for u in urls])), n
            ),
            "ijepa.data.tario (headers parsed directly)": parse_us(lambda: tar_samples({"url": u} for u in urls), n),
        }

    print(f"torchvision ImageFolder (PIL)       {r_folder:8.0f} images/s")
    print(f"ijepa shards (tario, simplejpeg)    {r_shards:8.0f} images/s")
    print(f"  same, uint8 batches, normalisation left to the trainer's device  {r_u8[WORKERS]:8.0f} images/s")
    print(f"raw JPEG decode only (the loader's decode_array)  {r_decode[WORKERS]:8.0f} images/s")
    print(f"raw JPEG decode only (cv2.imdecode)               {r_cv2:8.0f} images/s")
    for name, us in tar_us.items():
        print(f"tar parsing alone, {name:<48} {us:6.1f} us per sample")
    print("workers  shards uint8  raw decode  ratio")
    for w in SCALING:
        print(f"{w:7d}  {r_u8[w]:12.0f}  {r_decode[w]:10.0f}  {100 * r_u8[w] / r_decode[w]:4.0f}%")
    print(
        f"shards / ImageFolder = {r_shards / r_folder:.2f}x (goal >= 1.5x); uint8 shards / raw decode at "
        f"{WORKERS} workers = {100 * r_u8[WORKERS] / r_decode[WORKERS]:.0f}% (goal >= 80%); with normalisation "
        f"in the consuming process {100 * r_shards / r_decode[WORKERS]:.0f}%"
    )


if __name__ == "__main__":
    main()
