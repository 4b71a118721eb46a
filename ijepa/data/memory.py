"""Small splits decoded once into memory: batches built in the training process, no loader workers.

For data sets that fit in memory (the Fashion-MNIST demo: 10,000 images of 28x28x3 uint8 are 24 MB), the
shards are read and decoded once per stage instead of once per epoch, and batches are cropped in the main
process: on a 2-core machine a loader worker competes with the two torch threads for the same cores.

Pretraining epochs here are seeded permutations of the rank's images (every image once per epoch; the
streaming loader resamples shards with replacement instead), fixed by (seed, epoch, rank); the crops of
batch i (and its colour and RandAugment draws) come from generators seeded by (seed, epoch, rank, i), so a
run resumed inside an epoch skips batches without replaying them. Masks are drawn at each batch's global
step, as in the streaming loader.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import UserError
from .loaders import image_bytes, pretrain_loader
from .tario import tar_samples
from .transforms import build_batch, decode_array
from .workers import STALL_TIMEOUT, mix_seed


@dataclass(frozen=True)
class DecodedSplit:
    """Every image of a split, decoded: ``images`` (BGR uint8 (H, W, 3) arrays), ``labels`` (N,), ``keys``."""

    images: list[np.ndarray]
    labels: torch.Tensor
    keys: list[str]

    def __len__(self) -> int:
        return len(self.keys)


class SplitTooLarge(UserError, MemoryError):
    """A split whose decoded images exceed the in-memory budget (the message names the setting to change)."""


def decode_split(
    urls: Sequence[str], max_bytes: int = 2 << 30, setting: str = "in_memory", limit: int | None = None
) -> DecodedSplit:
    """Read and decode every sample of ``urls`` (in shard order), or the first ``limit`` of them.

    Args:
        urls: the split's shards.
        max_bytes: refuse to hold more decoded pixels than this (default 2 GiB): an ImageNet-sized split
            belongs to the streaming loaders.
        setting: the params key that chose this path, named in the error.
        limit: stop after this many samples (None: all).
    Raises:
        SplitTooLarge: naming the split's first shard when the decoded images would exceed ``max_bytes``.
    """
    if not urls:
        raise ValueError("decode_split needs at least one shard")
    images, labels, keys, total = [], [], [], 0
    samples = tar_samples({"url": u} for u in urls)
    for sample in itertools.islice(samples, limit):
        arr = decode_array(*image_bytes(sample))
        total += arr.nbytes
        if total > max_bytes:
            raise SplitTooLarge(
                f"the split of {urls[0]} decodes to more than {max_bytes / 2**30:.1f} GiB; stream it instead "
                f"({setting}: false)"
            )
        images.append(arr)
        labels.append(int(sample["cls"]))
        keys.append(sample["__key__"])
    return DecodedSplit(images, torch.tensor(labels), keys)


def memory_batches(
    split: DecodedSplit,
    *,
    batch_size: int,
    collator,
    transform,
    batches_per_epoch: int,
    epoch: int,
    start: int = 0,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[tuple]:
    """Batches ``start .. batches_per_epoch - 1`` of one training epoch, in ``pretrain_loader``'s format:
    ``((images uint8 (B, S, S, 3) BGR, labels), masks_enc, masks_pred)`` (``(images, labels)`` without a
    collator).

    Args:
        split: from ``decode_split``.
        batch_size: per-rank batch B.
        collator: ``MultiBlockMaskCollator`` (masks at global step ``epoch * batches_per_epoch + i``) or None.
        transform: ``PretrainTransform``.
        batches_per_epoch: batches per epoch on every rank; the rank's images are visited in a seeded
            permutation, a new one whenever they run out.
        epoch, start: the epoch and the first batch to yield (a resumed run skips the ones before).
        seed, rank, world_size: each rank takes images ``rank::world_size``; draws are fixed by these.
    """
    mine = np.arange(rank, len(split), world_size)
    if len(mine) < batch_size:
        raise ValueError(f"rank {rank} holds {len(mine)} images, fewer than one batch of {batch_size}")
    needed = batches_per_epoch * batch_size
    perm_rng = np.random.default_rng(mix_seed("memory-perm", seed, epoch, rank))
    order = np.concatenate([perm_rng.permutation(mine) for _ in range(-(-needed // len(mine)))])
    for i in range(start, batches_per_epoch):
        idx = order[i * batch_size : (i + 1) * batch_size]
        rng = random.Random(mix_seed("memory-crops", seed, epoch, rank, i))
        with torch.random.fork_rng(devices=[]):  # colour, blur and RandAugment draw from torch's RNG
            torch.manual_seed(mix_seed("memory-torch", seed, epoch, rank, i) % 2**63)
            images = build_batch([split.images[j] for j in idx], transform, rng)
        batch = (images, split.labels[idx])
        if collator is None:
            yield batch
        else:
            yield (batch, *collator.sample(batch_size, epoch * batches_per_epoch + i))


def memory_eval_batches(
    split: DecodedSplit, *, batch_size: int, transform, rank: int = 0, world_size: int = 1
) -> Iterator[tuple]:
    """``eval_loader``'s batches ``(images uint8 (B, S, S, 3) BGR, labels, keys)`` over this rank's images
    (``rank::world_size``: across ranks every image once), in order."""
    mine = list(range(rank, len(split), world_size))
    for lo in range(0, len(mine), batch_size):
        idx = mine[lo : lo + batch_size]
        yield build_batch([split.images[i] for i in idx], transform), split.labels[idx], [split.keys[i] for i in idx]


def epoch_batches(
    source: DecodedSplit | Sequence[str],
    *,
    collator,
    batches_per_epoch: int,
    epoch: int,
    start: int = 0,
    num_workers: int = 0,
    shuffle_buffer: int = 1000,
    counts: Sequence[int] | None = None,
    stall_timeout: float = STALL_TIMEOUT,
    **stream,
) -> Iterator[tuple]:
    """Batches ``start ..`` of one training epoch from a decoded split (``memory_batches``) or from shards
    (``pretrain_loader`` with ``num_workers``, ``shuffle_buffer``, the shards' sample ``counts`` and
    ``stall_timeout``, its first ``start`` batches skipped);
    ``stream`` holds the arguments both take (batch_size, transform, seed, rank, world_size)."""
    common = dict(collator=collator, batches_per_epoch=batches_per_epoch, epoch=epoch, **stream)
    if isinstance(source, DecodedSplit):
        return memory_batches(source, start=start, **common)
    if collator is not None:
        collator.set_start_step(epoch * batches_per_epoch)
    loader = pretrain_loader(
        source, num_workers=num_workers, shuffle_buffer=shuffle_buffer, counts=counts, stall_timeout=stall_timeout,
        **common,
    )  # fmt: skip
    return itertools.islice(loader, start, None)
