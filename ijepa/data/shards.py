"""Write verified WebDataset shards and their manifest.

Layout: ``<out>/<split>/shard-NNNNNN.tar`` with one sample per image (``__key__``, ``jpg`` or ``png``,
``cls`` = class index, ``json`` = {"label", "class", "source"}), and ``<out>/manifest.json``.
Samples are shuffled once by seed so every shard mixes classes. Tar headers carry a fixed mtime, so the
same inputs and parameters give byte-identical shards. The whole output is built in a temporary sibling
folder and swapped in at the end: a failure leaves any previous output untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm

from ..errors import DataError
from .sources import (
    FASHION_MNIST_CLASSES,
    Clean,
    SkipImage,
    encode_png,
    read_fashion_mnist,
    sanitize_image,
    scan_image_folder,
)
from .workers import worker_context

MANIFEST = "manifest.json"
# the splits with labels that evaluation reads; `unlabeled` (prepare.unlabeled_per_class) is for pretraining only
LABELLED_SPLITS = ("train", "val", "test")
_MTIME = 0  # fixed integer tar header time: reproducible bytes, and no PAX header per member (a float forces one)


@dataclass(frozen=True)
class Item:
    """One input: where it comes from (for the manifest) and its label."""

    source: str
    label: int
    ref: object  # a file path (str) or an array, handed to the encoder


def _encode(item_ref: object) -> Clean | str:
    """Worker function: Clean, or the skip reason as a string."""
    try:
        if isinstance(item_ref, np.ndarray):
            h, w = item_ref.shape[:2]
            return Clean(encode_png(item_ref), "png", w, h, "")
        path = Path(item_ref)
        return sanitize_image(path.read_bytes())
    except SkipImage as e:
        return str(e)
    except OSError as e:
        return f"unreadable file: {e}"


def _stratified(
    items: Sequence[Item], rng: random.Random, per_class: int | None, fraction: float, beyond: int | None = 0
):
    """Per class: shuffle, keep ``per_class`` (None = all), split off ``fraction`` -> (kept, carved, extra), where
    extra holds up to ``beyond`` more images per class from those past ``per_class`` (None: all of them)."""
    by_class: dict[int, list[Item]] = {}
    for it in items:
        by_class.setdefault(it.label, []).append(it)
    kept, carved, extra = [], [], []
    for label in sorted(by_class):
        group = by_class[label]
        rng.shuffle(group)
        if per_class is not None:
            rest = group[per_class:]
            extra += rest if beyond is None else rest[:beyond]
            group = group[:per_class]
        n_carve = round(len(group) * fraction)
        carved += group[:n_carve]
        kept += group[n_carve:]
    return kept, carved, extra


class SplitTooSmall(DataError):
    """A split that would get no image of some class; ``setting`` names the argument to change."""

    def __init__(self, message: str, setting: str):
        super().__init__(message)
        self.setting = setting


def check_split_sizes(kept: Sequence[Item], carved: Sequence[Item], classes: Sequence[str], fraction: float) -> None:
    """Every class must keep a training image, and get a ``val`` image when ``fraction`` > 0; else
    ``SplitTooSmall`` naming the split, the images per class it would get and the value that would do."""
    n_kept, n_carved = Counter(it.label for it in kept), Counter(it.label for it in carved)
    totals = {c: n_kept[c] + n_carved[c] for c in range(len(classes)) if n_kept[c] + n_carved[c]}
    for split, got, fix in (
        ("val", n_carved, lambda n: f"raise it to at least {1 / n:.3g} for one image per class"),
        ("train", n_kept, lambda n: f"lower it below {(n - 0.5) / n:.3g} to keep one training image per class"),
    ):
        short = [c for c in totals if got[c] == 0]
        if fraction == 0 or not short:
            continue
        smallest = min(totals[c] for c in short)
        if smallest < 2:
            fix = lambda n: "a class of one image cannot give both train and val one"  # noqa: E731
        raise SplitTooSmall(
            f"split {split!r} would get 0 images per class for {len(short)} of {len(totals)} classes (first: "
            f"{classes[short[0]]!r}; val_fraction {fraction:g} of {smallest} images rounds to "
            f"{round(smallest * fraction)}): {fix(smallest)}, or add images",
            "val_fraction",
        )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_split(
    split: str, items: list[Item], classes: list[str], out: Path, shard_size: int, workers: int, progress: bool
) -> tuple[dict, list[dict], Counter]:
    """Encode ``items`` in parallel (order kept) and write shards; returns (split info, skipped, sizes)."""
    folder = out / split
    folder.mkdir(parents=True)
    shards, skipped, sizes, per_class = [], [], Counter(), Counter()
    writer, n_written, n_converted = None, 0, 0
    with worker_context().Pool(max(1, workers)) as pool:  # not forks of this process: see worker_context
        results = pool.imap(_encode, (it.ref for it in items), chunksize=64)
        for it, res in tqdm(
            zip(items, results, strict=True),
            total=len(items),
            desc=f"prepare {split}",
            disable=not progress,
            mininterval=2.0,
        ):
            if isinstance(res, str):
                skipped.append({"split": split, "path": it.source, "reason": res})
                continue
            if writer is None or n_written % shard_size == 0:
                if writer is not None:
                    writer.close()
                name = f"shard-{len(shards):06d}.tar"
                writer = wds.TarWriter(str(folder / name), mtime=_MTIME)
                shards.append({"file": f"{split}/{name}", "count": 0})
            meta = {"label": it.label, "class": classes[it.label], "source": it.source}
            if res.note:
                meta["converted"] = res.note
                n_converted += 1
            writer.write(
                {
                    "__key__": f"{n_written:08d}",
                    res.ext: res.data,
                    "cls": str(it.label).encode(),
                    "json": json.dumps(meta, sort_keys=True).encode(),
                }
            )
            shards[-1]["count"] += 1
            n_written += 1
            per_class[classes[it.label]] += 1
            sizes[f"{res.width}x{res.height}"] += 1
    if writer is not None:
        writer.close()
    for s in shards:
        s["sha256"] = _sha256(out / s["file"])
    info = {
        "count": n_written,
        "per_class": {c: per_class.get(c, 0) for c in classes},
        "shards": shards,
        "converted": n_converted,
    }
    return info, skipped, sizes


def write_dataset(
    splits: dict[str, list[Item]],
    classes: list[str],
    out_dir: str | Path,
    *,
    shard_size: int,
    seed: int,
    workers: int,
    source: dict,
    warnings: Iterable[str] = (),
    skipped: Iterable[dict] = (),
    progress: bool = True,
) -> dict:
    """Shuffle each split by seed, encode, shard, and write the manifest; swap the result into ``out_dir``.

    Raises:
        ValueError: a split that ends with no usable image (the previous output is kept).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    out_dir = Path(out_dir)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        manifest = {
            "format": "webdataset",
            "classes": classes,
            "source": source,
            "seed": seed,
            "shard_size": shard_size,
            "splits": {},
            "skipped": list(skipped),
            "warnings": list(warnings),
        }
        sizes: Counter = Counter()
        for split, items in splits.items():
            items = list(items)
            random.Random(f"{seed}-{split}").shuffle(items)
            info, skips, split_sizes = _write_split(split, items, classes, tmp, shard_size, workers, progress)
            manifest["skipped"] += skips
            sizes += split_sizes
            if info["count"] == 0:
                reasons = Counter(s["reason"] for s in skips).most_common(3)
                raise DataError(f"split {split!r} has no usable image ({len(items)} inputs; skipped: {reasons})")
            manifest["splits"][split] = info
        manifest["image_sizes"] = {"most_common": dict(sizes.most_common(20)), "distinct": len(sizes)}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            out_dir.rename(old)
            tmp.rename(out_dir)
            shutil.rmtree(old)
        else:
            tmp.rename(out_dir)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def prepare_image_folder(
    train_dir: str | Path,
    out_dir: str | Path,
    *,
    test_dir: str | Path | None = None,
    val_fraction: float = 0.05,
    max_per_class: int | None = None,
    unlabeled_per_class: int | None = 0,
    seed: int = 0,
    shard_size: int = 1000,
    workers: int = 2,
    progress: bool = True,
    warn: Callable[[str], None] = print,
) -> dict:
    """ImageFolder tree(s) -> shards of splits train, val (carved from train, stratified) and test.

    Args:
        train_dir: ``<class>/<image>`` tree (ImageNet ``train/``).
        out_dir: output folder (``data/shards``).
        test_dir: optional held-out tree with the same classes (ImageNet ``val/``), written as ``test``.
        val_fraction: share of each training class carved into ``val``.
        max_per_class: cap per class in train (before carving) and test; None = all.
        unlabeled_per_class: up to this many more training images per class, past ``max_per_class``, written
            as the ``unlabeled`` split (pretraining data that no probe or classifier reads; None: all of them).
        seed, shard_size, workers, progress: shuffling seed, samples per shard, encoding processes, bar.
        warn: receives warnings (empty class folders).
    Returns:
        The manifest dict.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    scan = scan_image_folder(train_dir)
    rng = random.Random(seed)
    as_items = lambda root, pairs: [Item(rel, lbl, str(Path(root) / rel)) for rel, lbl in pairs]  # noqa: E731
    items = as_items(train_dir, scan.items)
    train, val, unlabeled = _stratified(items, rng, max_per_class, val_fraction, unlabeled_per_class)
    check_split_sizes(train, val, scan.classes, val_fraction)
    splits = {"train": train, "val": val}
    warns, skipped = list(scan.warnings), [{"split": "train", **s} for s in scan.skipped]
    if test_dir is not None:
        tscan = scan_image_folder(test_dir, classes=scan.classes)
        splits["test"], _, _ = _stratified(as_items(test_dir, tscan.items), rng, max_per_class, 0.0)
        warns += tscan.warnings
        skipped += [{"split": "test", **s} for s in tscan.skipped]
    if not val:
        splits.pop("val")
    if unlabeled:
        splits["unlabeled"] = unlabeled
    for w in warns:
        warn(f"warning: {w}")
    source = {
        "kind": "image_folder",
        "train_dir": str(train_dir),
        "test_dir": str(test_dir) if test_dir else None,
        "val_fraction": val_fraction,
        "max_per_class": max_per_class,
        "unlabeled_per_class": unlabeled_per_class,
    }
    return write_dataset(
        splits,
        scan.classes,
        out_dir,
        shard_size=shard_size,
        seed=seed,
        workers=workers,
        source=source,
        warnings=warns,
        skipped=skipped,
        progress=progress,
    )


def prepare_fashion_mnist(
    src_dir: str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.1,
    max_per_class: int | None = None,
    test_max_per_class: int | None = None,
    unlabeled_per_class: int | None = 0,
    seed: int = 0,
    shard_size: int = 1000,
    workers: int = 2,
    progress: bool = True,
) -> dict:
    """Fashion-MNIST idx files -> grey 28x28 PNG shards of train, val (carved from train) and test (t10k).

    Args:
        src_dir: folder with the four ``*-ubyte.gz`` files (see ``sources.find_fashion_mnist``).
        max_per_class / test_max_per_class: per-class caps for train (before carving) and test.
        Others as ``prepare_image_folder`` (``unlabeled_per_class``: the ``unlabeled`` split from the training
        images past ``max_per_class``).
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    src_dir = Path(src_dir)
    rng = random.Random(seed)
    splits, unlabeled = {}, []
    for split, cap, frac in (("train", max_per_class, val_fraction), ("test", test_max_per_class, 0.0)):
        images, labels = read_fashion_mnist(src_dir, split)
        items = [Item(f"fashion-mnist/{split}/{i}", int(lbl), images[i]) for i, lbl in enumerate(labels)]
        kept, carved, extra = _stratified(items, rng, cap, frac, unlabeled_per_class if split == "train" else 0)
        check_split_sizes(kept, carved, FASHION_MNIST_CLASSES, frac)
        splits[split] = kept
        if split == "train" and carved:
            splits["val"] = carved
        if extra:
            unlabeled = extra
    source = {
        "kind": "fashion_mnist",
        "dir": str(src_dir),
        "val_fraction": val_fraction,
        "max_per_class": max_per_class,
        "test_max_per_class": test_max_per_class,
        "unlabeled_per_class": unlabeled_per_class,
    }
    if unlabeled:
        splits["unlabeled"] = unlabeled
    return write_dataset(
        splits,
        list(FASHION_MNIST_CLASSES),
        out_dir,
        shard_size=shard_size,
        seed=seed,
        workers=workers,
        source=source,
        progress=progress,
    )


def read_manifest(shard_dir: str | Path) -> dict:
    """The manifest of a prepared shard folder (a clear error when the folder was never prepared)."""
    path = Path(shard_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run the prepare stage first (dvc repro prepare)")
    return json.loads(path.read_text())


def labelled_splits(manifest: dict) -> list[str]:
    """The manifest's splits that evaluation reads (train, val, test where present), in that order."""
    return [s for s in LABELLED_SPLITS if s in manifest["splits"]]


def shard_urls(shard_dir: str | Path, split: str) -> list[str]:
    """Paths of a split's shards, in order, checked against the manifest."""
    manifest = read_manifest(shard_dir)
    if split not in manifest["splits"]:
        raise DataError(f"split {split!r} not in {Path(shard_dir) / MANIFEST} (has {sorted(manifest['splits'])})")
    urls = [str(Path(shard_dir) / s["file"]) for s in manifest["splits"][split]["shards"]]
    missing = [u for u in urls if not Path(u).is_file()]
    if missing:
        raise FileNotFoundError(f"shards listed in the manifest are missing: {missing[:5]}")
    return urls
