"""Streaming loaders over the prepared shards: pretraining (resampled, fixed-length epochs) and evaluation.

Batches leave the loaders as uint8 ``(B, H, W, 3)`` arrays in OpenCV's BGR order, built in the workers
straight into shared memory (each image is decoded, then at once cropped and resized into its slot of the
batch: no per-image channel shuffle, no stacking copy, 4x less inter-process traffic than float32). The
workers reuse a few shared-memory batch buffers (``BatchSlots``), each once the consumer has let go of
the batch in it, and send labels and masks as small numpy arrays inside the message rather than as
tensors that would each need a shared-memory segment and a file-descriptor hand-over.
``Normalize`` (``ijepa.data.transforms``) turns the images into the model's float ``(B, 3, H, W)`` RGB input
on the training device.
Grey images are replicated to 3 channels at decode (OpenCV ``IMREAD_COLOR``), so every model has a
3-channel patch embedding and official RGB weights apply unchanged.

Pretraining: the split's samples, in shard order, are cut into ``world_size`` equal contiguous slices (to
one image), so every rank holds the same number of images whatever the shard sizes; a rank's slice is a
list of pieces ``(shard, first sample, end)``. Each worker resamples pieces with replacement, with
probability proportional to the images they hold (a short last shard comes up as often as its images
warrant, not as often as a full shard), and shuffles samples in a buffer, all from generators seeded by
(seed, epoch, rank, worker); an epoch is exactly ``batches_per_epoch`` batches on every rank
(``with_epoch``), so DDP never waits at an epoch end. Masks are drawn inside the workers, at each batch's
global step. Shards are read by ``tario`` (tar headers parsed directly, slices seeked to).

Evaluation: every sample exactly once across ranks and workers, in a deterministic order: shards are
dealt to the (rank, worker) readers when there are enough of them, otherwise every reader scans all shards
and keeps every n-th sample.

Workers start from a fork server, never as forks of the training process, and a loader (``ijepa.data.workers``)
that delivers no batch for ``stall_timeout`` seconds raises ``LoaderStalled`` naming each worker's state.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from .tario import ShardError, count_samples, tar_samples
from .transforms import EvalTransform, PretrainTransform, build_batch, decode_array, decode_image
from .workers import (  # noqa: F401 (LoaderStalled, STALL_TIMEOUT, worker_context: part of this module's API)
    STALL_TIMEOUT,
    BatchSlots,
    LoaderStalled,
    Recycling,
    keep_batch,
    map_tree,
    mix_seed,
    worker_context,
    worker_info,
    worker_options,
)


def rank_pieces(urls: Sequence[str], counts: Sequence[int], rank: int, world_size: int) -> list[dict]:
    """This rank's slice ``[rank N / W, (rank + 1) N / W)`` of the split's N samples (shards concatenated in
    order) as pieces ``{"url", "start", "stop"}`` (sample indices within the shard)."""
    if len(urls) != len(counts):
        raise ValueError(f"{len(urls)} shards but {len(counts)} counts")
    total = sum(counts)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    pieces, first = [], 0
    for url, n in zip(urls, counts, strict=True):
        a, b = max(lo, first) - first, min(hi, first + n) - first
        if a < b:
            pieces.append({"url": url, "start": a, "stop": b})
        first += n
    return pieces


class RankShards(torch.utils.data.IterableDataset):
    """Infinite stream of this rank's pieces of shards, resampled with replacement per worker, each with
    probability proportional to its number of samples."""

    def __init__(self, pieces: Sequence[dict], rank: int, seed: int, epoch: int):
        super().__init__()
        self.pieces = list(pieces)
        self.weights = [p["stop"] - p["start"] for p in self.pieces]
        self.rank, self.seed, self.epoch = rank, seed, epoch

    def __iter__(self) -> Iterator[dict]:
        rng = random.Random(mix_seed("shards", self.seed, self.epoch, self.rank, worker_info()[0]))
        while True:
            yield from rng.choices(self.pieces, weights=self.weights, k=64)


def _shuffle(src: Iterator, bufsize: int, seed: int, epoch: int, rank: int, initial: int = 100) -> Iterator:
    """Buffer shuffle with a (seed, epoch, rank, worker)-seeded generator (webdataset's default is unseeded).

    Starts yielding once ``initial`` samples are buffered and grows the buffer to ``bufsize`` by reading
    two samples per one yielded, so an epoch does not begin by reading a whole buffer.
    """
    rng = random.Random(mix_seed("samples", seed, epoch, rank, worker_info()[0]))
    it = iter(src)
    buf: list = []
    for sample in it:
        buf.append(sample)
        if len(buf) < bufsize:
            nxt = next(it, None)
            if nxt is not None:
                buf.append(nxt)
        if len(buf) >= min(initial, bufsize):
            k = rng.randrange(len(buf))
            buf[k], buf[-1] = buf[-1], buf[k]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


def image_bytes(sample: dict) -> tuple[bytes, str]:
    data = sample.get("jpg", sample.get("png"))
    where = f"key {sample.get('__key__')} in {sample.get('__url__')}"
    if data is None:
        raise ShardError(f"{where} has no jpg or png entry (has {sorted(k for k in sample if not k.startswith('__'))})")
    return data, where


def _decode_batch(samples: Sequence[dict], transform, rng: random.Random | None, out: torch.Tensor | None):
    """``build_batch`` of the samples' images, each decoded just before its transform: the decoded image
    (0.56 MB at 500 x 375) is still in the CPU cache when it is cropped, and a batch never holds 64 of them."""
    images = (decode_array(*image_bytes(s)) for s in samples)
    return build_batch(images, transform, rng, out, count=len(samples))


def _pretrain_batches(
    src: Iterator[dict], batch_size: int, transform, collator, seed: int, epoch: int, rank: int, slots: BatchSlots
):
    """Worker stage: ``(slot tag, batch)`` of full batches ``((images, labels), masks_enc, masks_pred)`` (no
    masks without collator); images go into ``slots`` in a worker process."""
    rng = random.Random(mix_seed("crops", seed, epoch, rank, worker_info()[0]))
    in_worker = get_worker_info() is not None
    size = transform.crop_size
    while True:
        samples = [s for _, s in zip(range(batch_size), src, strict=False)]
        if len(samples) < batch_size:
            return
        out, tag = slots.take((batch_size, size, size, 3)) if in_worker else (None, None)
        batch = (_decode_batch(samples, transform, rng, out), np.array([int(s["cls"]) for s in samples]))
        if collator is None:
            yield tag, batch
        else:
            masks = collator.sample(batch_size, collator.next_step())
            yield tag, (batch, *map_tree(masks, lambda t: t.numpy() if isinstance(t, torch.Tensor) else t))


def _first(batch) -> torch.Tensor:
    return batch[0]


def _pretrain_images(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch[0], torch.Tensor) else batch[0][0]


def pretrain_loader(
    urls: Sequence[str],
    *,
    batch_size: int,
    collator,
    transform: PretrainTransform,
    batches_per_epoch: int,
    epoch: int,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    shuffle_buffer: int = 1000,
    counts: Sequence[int] | None = None,
    stall_timeout: float = STALL_TIMEOUT,
    name: str = "pretrain loader",
) -> Iterable:
    """Loader for one pretraining epoch: exactly ``batches_per_epoch`` batches of
    ``((images uint8 (B, S, S, 3) BGR, labels), masks_enc, masks_pred)``.

    Args:
        urls: the train split's shards.
        batch_size: per-rank batch B.
        collator: ``MultiBlockMaskCollator`` (masks drawn in the workers at each batch's global step; call
            its ``set_start_step`` first), or None for ``(images, labels)`` batches.
        transform: ``PretrainTransform``.
        batches_per_epoch: iterations per epoch (the same on every rank).
        epoch, seed, rank, world_size: fix every random draw of the data stream.
        num_workers: DataLoader worker processes.
        shuffle_buffer: samples held for shuffling in each worker.
        counts: samples per shard (the manifest's; None: counted from the tar headers).
        stall_timeout: seconds without a batch from the workers before ``LoaderStalled`` (0: wait forever).
        name: the loader's name in that error.
    """
    if not urls:
        raise ValueError("pretrain_loader needs at least one shard")
    counts = [count_samples(u) for u in urls] if counts is None else list(counts)
    pieces = rank_pieces(urls, counts, rank, world_size)
    if sum(p["stop"] - p["start"] for p in pieces) < batch_size:
        raise ValueError(f"rank {rank} of {world_size} holds fewer images than one batch of {batch_size}")
    slots = BatchSlots(num_workers, name=name, stall_timeout=stall_timeout)
    pipeline = wds.DataPipeline(
        RankShards(pieces, rank, seed, epoch),
        tar_samples,
        functools.partial(_shuffle, bufsize=shuffle_buffer, seed=seed, epoch=epoch, rank=rank),
        functools.partial(
            _pretrain_batches,
            batch_size=batch_size,
            transform=transform,
            collator=collator,
            seed=seed,
            epoch=epoch,
            rank=rank,
            slots=slots,
        ),
    )
    base = mix_seed("worker", seed, epoch, rank)
    if num_workers == 0:
        torch.manual_seed(base % 2**63)
    loader = wds.WebLoader(
        pipeline,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=keep_batch,
        persistent_workers=False,
        **worker_options(num_workers, base, slots),
    )
    return Recycling(loader.with_epoch(batches_per_epoch), slots, _pretrain_images)


class _EvalBatches(torch.utils.data.IterableDataset):
    """Exact-once reader: batches (images, labels, keys) of the samples of this (rank, worker)."""

    def __init__(self, urls, transform, batch_size: int, rank: int, world_size: int, slots: BatchSlots):
        super().__init__()
        self.urls, self.transform, self.batch_size = list(urls), transform, batch_size
        self.rank, self.world_size, self.slots = rank, world_size, slots
        self.num_workers = slots.shape[0]

    def _mine(self) -> Iterator[dict]:
        readers = self.world_size * self.num_workers
        me = self.rank * self.num_workers + worker_info()[0]
        by_shard = len(self.urls) >= readers
        urls = self.urls[me::readers] if by_shard else self.urls
        samples = tar_samples({"url": u} for u in urls)
        for i, sample in enumerate(samples):
            if by_shard or i % readers == me:
                yield sample

    def __iter__(self):
        in_worker = get_worker_info() is not None
        size = self.transform.crop_size
        it = self._mine()
        while samples := [s for _, s in zip(range(self.batch_size), it, strict=False)]:
            out, tag = self.slots.take((len(samples), size, size, 3)) if in_worker else (None, None)
            batch = (
                _decode_batch(samples, self.transform, None, out),
                np.array([int(s["cls"]) for s in samples]),
                [s["__key__"] for s in samples],
            )
            yield tag, batch


def eval_loader(
    urls: Sequence[str],
    *,
    batch_size: int,
    transform: EvalTransform,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 2,
    stall_timeout: float = STALL_TIMEOUT,
    name: str = "eval loader",
) -> Iterable:
    """Deterministic loader yielding ``(images uint8 (B, S, S, 3) BGR, labels, keys)``; across all ranks and
    workers every sample of ``urls`` appears exactly once (keys identify them for gathering). With workers,
    ``LoaderStalled`` (naming ``name``) after ``stall_timeout`` seconds without a batch (0: wait forever)."""
    slots = BatchSlots(num_workers, name=name, stall_timeout=stall_timeout)
    ds = _EvalBatches(urls, transform, batch_size, rank, world_size, slots)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_size=None,
        num_workers=num_workers,
        collate_fn=keep_batch,
        **worker_options(num_workers, 0, slots),
    )
    return Recycling(loader, slots, _first)


def read_images(urls: Sequence[str], keys: Sequence[str]) -> dict[str, torch.Tensor]:
    """Fetch specific samples by key from shards: key -> (3, H, W) uint8 RGB (for pictures)."""
    wanted, found = set(keys), {}
    for sample in tar_samples({"url": u} for u in urls):
        if sample["__key__"] in wanted:
            found[sample["__key__"]] = decode_image(*image_bytes(sample))
            if len(found) == len(wanted):
                break
    missing = wanted - set(found)
    if missing:
        raise ShardError(f"keys not found in the shards: {sorted(missing)[:5]}")
    return found
