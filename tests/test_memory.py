"""In-memory splits: decoded once, epochs as seeded permutations, resumable mid-epoch, ranks disjoint."""

from __future__ import annotations

import pytest
import torch

from ijepa.data import eval_loader, eval_transform, prepare_image_folder, pretrain_transform, shard_urls
from ijepa.data.memory import decode_split, memory_batches, memory_eval_batches
from ijepa.masks import MultiBlockMaskCollator

from .helpers import make_folder

MASKS = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), npred=4, min_keep=4)


@pytest.fixture
def urls(tmp_path):
    src = make_folder(tmp_path / "train", per_class=8)  # 24 images of three classes, varied sizes
    prepare_image_folder(src, tmp_path / "shards", val_fraction=0.0, shard_size=5, workers=1, progress=False)
    return shard_urls(tmp_path / "shards", "train")


def epoch(split, ep, start=0, rank=0, world_size=1, bpe=3, collator=None):
    return list(
        memory_batches(
            split,
            batch_size=4,
            collator=collator,
            transform=pretrain_transform(16, crop_scale=(0.5, 1.0), horizontal_flip=True),
            batches_per_epoch=bpe,
            epoch=ep,
            start=start,
            seed=3,
            rank=rank,
            world_size=world_size,
        )
    )


def test_decoded_split_matches_the_streaming_eval_loader(urls):
    split = decode_split(urls)
    assert len(split) == 24 and split.labels.tolist().count(2) == 8
    ref = [
        (img, int(lbl), key)
        for imgs, lbls, keys in eval_loader(urls, batch_size=5, transform=eval_transform(16), num_workers=0)
        for img, lbl, key in zip(imgs, lbls, keys, strict=True)
    ]
    mine = [
        (img, int(lbl), key)
        for imgs, lbls, keys in memory_eval_batches(split, batch_size=7, transform=eval_transform(16))
        for img, lbl, key in zip(imgs, lbls, keys, strict=True)
    ]
    assert [m[1:] for m in mine] == [r[1:] for r in ref]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(mine, ref, strict=True))


def test_epoch_visits_every_image_once_and_is_seeded(urls):
    split = decode_split(urls)
    batches = epoch(split, 0, bpe=6)  # 6 x 4 = all 24 images
    labels = torch.cat([lbl for _, lbl in batches])
    assert sorted(labels.tolist()) == sorted(split.labels.tolist())
    assert all(imgs.shape == (4, 16, 16, 3) and imgs.dtype == torch.uint8 for imgs, _ in batches)
    again = epoch(split, 0, bpe=6)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))
    other = epoch(split, 1, bpe=6)
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(batches, other, strict=True))
    longer = epoch(split, 0, bpe=9)  # more batches than images: a fresh permutation continues
    assert len(longer) == 9 and all(torch.equal(a[0], b[0]) for a, b in zip(batches, longer, strict=False))


def test_resume_mid_epoch_and_masks_at_global_steps(urls):
    split = decode_split(urls)
    coll = MultiBlockMaskCollator(16, 2, **MASKS)  # an 8x8 grid
    full = epoch(split, 2, collator=coll)
    tail = epoch(split, 2, start=1, collator=coll)
    assert len(tail) == 2
    for (a, ea, pa), (b, eb, pb) in zip(full[1:], tail, strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        assert torch.equal(ea[0], eb[0]) and all(torch.equal(x, y) for x, y in zip(pa, pb, strict=True))
    for i, (_, enc, pred) in enumerate(full):
        ref_enc, ref_pred = coll.sample(4, 2 * 3 + i)
        assert torch.equal(enc[0], ref_enc[0]) and torch.equal(pred[3], ref_pred[3])


def test_ranks_take_disjoint_images(urls):
    split = decode_split(urls)
    seen = []
    for rank in range(2):
        labels = torch.cat([lbl for _, lbl in epoch(split, 0, rank=rank, world_size=2)])
        assert len(labels) == 12
        seen.append(labels)
    assert sorted(torch.cat(seen).tolist()) == sorted(split.labels.tolist())
    with pytest.raises(ValueError, match="rank 0 holds 3 images, fewer than one batch of 4"):
        epoch(split, 0, world_size=8)


def test_a_split_too_large_for_memory_is_refused_naming_the_setting(urls):
    with pytest.raises(MemoryError, match=r"shard-000000.tar decodes to more than .*data.in_memory: false"):
        decode_split(urls, max_bytes=2000, setting="data.in_memory")
