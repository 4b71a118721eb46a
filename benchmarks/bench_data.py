"""Data loading: WebDataset shards vs torchvision ImageFolder on the same JPEGs and transforms, and raw decode.

Builds an ImageFolder of real images (Fashion-MNIST items, colour-tinted and upscaled to JPEGs of
ImageNet's most common size, 500x375, quality 90; ``--size`` for others), prepares shards from it with
``ijepa.data.prepare_image_folder`` (JPEGs stored unchanged), then times, with 2 worker processes each and
the pretraining transform (RandomResizedCrop 224, flip, normalise):
  - torchvision ``ImageFolder`` (PIL decode) + DataLoader, shuffled;
  - ``ijepa.data.pretrain_loader`` over the shards (tar headers parsed by ``ijepa.data.tario``, JPEG decode
    by ``decode_array``, crop in uint8 into reused shared-memory batches, resampled shards, shuffle buffer,
    the manifest's sample counts as training passes them), once normalised to float in the consuming
    process and once left as uint8 (the trainer normalises on its device);
  - raw JPEG decoding alone with the loader's ``decode_array`` (and with ``cv2.imdecode``), no transform,
    as the ceiling.
The shard loader and the raw decode are also timed with 1, 2 and 4 processes (worker scaling), and reading
the shards' samples without decoding with webdataset's tar reader and with ``ijepa.data.tario``.
Rates are steady-state images/s, median over epochs: the decode pool is started before its clock starts,
and the loaders' clocks start at their first batch (starting the workers and filling the shuffle buffer,
paid once per epoch, is printed on its own). Prints the rates and the ratios.

    python benchmarks/bench_data.py [--images 3000] [--epochs 3] [--size 500x375]
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

from ijepa.data import find_fashion_mnist, prepare_image_folder, pretrain_loader, pretrain_transform, read_manifest
from ijepa.data.sources import read_fashion_mnist
from ijepa.data.tario import tar_samples
from ijepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, decode_array, resize_into
from ijepa.data.workers import shared_uint8

CROP, BATCH, WORKERS = 224, 64, 2
SCALING = (1, 2, 4)  # worker processes for the scaling table


def build_folder(root: Path, n: int, size: tuple[int, int]) -> None:
    images, labels = read_fashion_mnist(find_fashion_mnist(None), "train")
    rng = np.random.default_rng(0)
    for i in range(n):
        grey = cv2.resize(images[i], size, interpolation=cv2.INTER_CUBIC).astype(np.float32)
        tint = rng.uniform(0.4, 1.0, 3)
        noise = rng.normal(0, 8, (size[1], size[0], 3))
        rgb = np.clip(grey[..., None] * tint + noise, 0, 255).astype(np.uint8)
        folder = root / f"class_{labels[i]}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rgb).save(folder / f"{i:06d}.jpg", quality=90)


def _init_worker(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


def rate(loader, normalize=None) -> tuple[float, float]:
    """(images per second after the first batch, seconds to the first batch) of one pass over ``loader``;
    ``normalize`` runs on each batch in this process (the shards' consumer side)."""
    t0 = time.perf_counter()
    first, seen = None, 0
    for imgs, _ in loader:
        if normalize is not None:
            imgs = normalize(imgs)
        if first is None:
            first = time.perf_counter()
        else:
            seen += len(imgs)
    return seen / (time.perf_counter() - first), first - t0


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


def buffer_ms(repeats: int = 30) -> tuple[float, float]:
    """Milliseconds per batch to get a (BATCH, CROP, CROP, 3) uint8 shared-memory buffer and write every byte
    of it: a fresh segment each time (what handing a new tensor to the consumer costs) against one segment
    reused (``BatchSlots``). Medians of ``repeats``."""
    shape = (BATCH, CROP, CROP, 3)
    reused = shared_uint8(shape)
    fresh, again = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        shared_uint8(shape).numpy().fill(1)
        t1 = time.perf_counter()
        reused.numpy().fill(1)
        t2 = time.perf_counter()
        fresh.append(t1 - t0)
        again.append(t2 - t1)
    return 1e3 * statistics.median(fresh), 1e3 * statistics.median(again)


def resize_us(files: list[str], n: int = 400) -> tuple[dict[str, float], float]:
    """Microseconds per crop to resize ``n`` RandomResizedCrop crops (the loader's draws) of the benchmark's
    images to CROP px, one thread: the loader's ``resize_into`` against single-pass alternatives; and the
    share of crops at 2x the output or more along an axis (those ``resize_into`` halves first)."""
    import random

    import torch.nn.functional as F

    tf, rng = pretrain_transform(CROP), random.Random(0)
    images = [decode_array(Path(f).read_bytes()) for f in files[:20]]
    crops = []
    for i in range(n):
        img = images[i % len(images)]
        top, left, h, w = tf.crop_params(rng, *img.shape[:2])
        crops.append(img[top : top + h, left : left + w])
    out = np.empty((CROP, CROP, 3), np.uint8)
    ways = {
        "ijepa resize_into (bilinear, halving first at 2x+)": lambda c: resize_into(c, out),
        "cv2 INTER_LINEAR alone": lambda c: cv2.resize(c, (CROP, CROP), dst=out, interpolation=cv2.INTER_LINEAR),
        "cv2 INTER_AREA": lambda c: cv2.resize(c, (CROP, CROP), dst=out, interpolation=cv2.INTER_AREA),
        "torch uint8 bilinear, antialias": lambda c: F.interpolate(
            torch.from_numpy(c).permute(2, 0, 1)[None], (CROP, CROP), mode="bilinear", antialias=True
        ),
    }
    times = {}
    for name, fn in ways.items():
        runs = []
        for _ in range(3):
            t0 = time.perf_counter()
            for c in crops:
                fn(c)
            runs.append((time.perf_counter() - t0) / n * 1e6)
        times[name] = statistics.median(runs)
    halved = sum(c.shape[0] >= 2 * CROP or c.shape[1] >= 2 * CROP for c in crops) / n
    return times, halved


def decode_pass(pool, files: list[str], decode) -> float:
    """Images per second decoding every file once in ``pool`` (no transform, no batching)."""
    t0 = time.perf_counter()
    pool.map(functools.partial(_decode_file, decode=decode), files, chunksize=64)
    return len(files) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=3000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--size", default="500x375", help="JPEG width x height (default: ImageNet's most common)")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root, shards = Path(tmp) / "folder", Path(tmp) / "shards"
        build_folder(root, args.images, size)
        prepare_image_folder(root, shards, val_fraction=0.0, shard_size=250, workers=2, progress=False)
        train = read_manifest(shards)["splits"]["train"]["shards"]
        urls, counts = [str(shards / s["file"]) for s in train], [s["count"] for s in train]
        files = sorted(str(p) for p in root.rglob("*.jpg"))
        n = len(files)
        print(
            f"{n} JPEGs {size[0]}x{size[1]} (mean {np.mean([Path(f).stat().st_size for f in files]) / 1024:.1f} KiB), "
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

        def shards_pass(epoch: int, workers: int, normalize=None) -> tuple[float, float]:
            loader = pretrain_loader(
                urls,
                batch_size=BATCH,
                collator=None,
                transform=pretrain_transform(CROP, horizontal_flip=True),
                batches_per_epoch=n // BATCH,
                epoch=epoch,
                num_workers=workers,
                counts=counts,
            )
            return rate(loader, normalize)

        # Each loader epoch runs right after a decode pass with as many processes, so that the machine's
        # drift hits both sides of a ratio alike; ratios are medians of these pairs.
        r_folder, r_shards, r_u8, r_decode, ratio, startup, r_cv2 = [], [], {}, {}, {}, [], []
        for w in SCALING:
            with mp.get_context("fork").Pool(w) as pool:
                decode_pass(pool, files[:200], decode_array)  # warm the pool
                for ep in range(args.epochs):
                    d = decode_pass(pool, files, decode_array)
                    r, first = shards_pass(ep, w)
                    r_decode.setdefault(w, []).append(d)
                    r_u8.setdefault(w, []).append(r)
                    ratio.setdefault(w, []).append(r / d)
                    if w == WORKERS:
                        startup.append(first)
                        r_shards.append(shards_pass(ep, w, Normalize())[0])
                        r_folder.append(rate(folder)[0])
                        r_cv2.append(decode_pass(pool, files, _cv2_decode))
        fresh_ms, reused_ms = buffer_ms()
        resize, halved = resize_us(files)
        tar_us = {
            "webdataset.tarfile_to_samples (Python tarfile)": parse_us(
                lambda: wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([{"url": u} for u in urls])), n
            ),
            "ijepa.data.tario (headers parsed directly)": parse_us(lambda: tar_samples({"url": u} for u in urls), n),
        }

    med = statistics.median
    r_folder, r_shards, r_cv2 = med(r_folder), med(r_shards), med(r_cv2)
    print(f"torchvision ImageFolder (PIL)       {r_folder:8.0f} images/s")
    print(f"ijepa shards (tario, simplejpeg)    {r_shards:8.0f} images/s")
    print(f"  same, uint8 batches, normalisation left to the trainer's device  {med(r_u8[WORKERS]):8.0f} images/s")
    print(f"raw JPEG decode only (the loader's decode_array)  {med(r_decode[WORKERS]):8.0f} images/s")
    print(f"raw JPEG decode only (cv2.imdecode)               {r_cv2:8.0f} images/s")
    for name, us in tar_us.items():
        print(f"tar parsing alone, {name:<48} {us:6.1f} us per sample")
    print(
        f"batch buffer {BATCH}x{CROP}x{CROP}x3 in shared memory, filled: fresh {fresh_ms:.1f} ms, reused "
        f"{reused_ms:.1f} ms per batch ({1e3 * (fresh_ms - reused_ms) / BATCH:.0f} us per image saved by BatchSlots)"
    )
    print(f"crop-resize to {CROP} px of the loader's crops ({100 * halved:.0f}% at 2x the output or more):")
    for name, us in resize.items():
        print(f"  {name:<52} {us:7.1f} us per crop")
    print(f"loader start-up (workers, shuffle buffer) to the first batch: {med(startup):.2f} s per epoch")
    print("workers  shards uint8  raw decode  ratio")
    for w in SCALING:
        print(f"{w:7d}  {med(r_u8[w]):12.0f}  {med(r_decode[w]):10.0f}  {100 * med(ratio[w]):4.0f}%")
    print(
        f"shards / ImageFolder = {r_shards / r_folder:.2f}x (goal >= 1.5x); uint8 shards / raw decode at "
        f"{WORKERS} workers = {100 * med(ratio[WORKERS]):.0f}% (goal >= 80%); with normalisation "
        f"in the consuming process {100 * r_shards / med(r_decode[WORKERS]):.0f}%"
    )


if __name__ == "__main__":
    main()
