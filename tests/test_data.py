"""Prepare stage data path and loaders: round trip, determinism, bad inputs, DDP splitting."""

from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from ijepa.data import (
    eval_loader,
    eval_transform,
    find_fashion_mnist,
    prepare_fashion_mnist,
    prepare_image_folder,
    pretrain_loader,
    pretrain_transform,
    read_manifest,
    shard_urls,
)
from ijepa.data.loaders import LoaderStalled
from ijepa.data.shards import SplitTooSmall
from ijepa.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Normalize, build_batch, decode_image, to_rgb_uint8
from ijepa.errors import UserError
from ijepa.masks import MultiBlockMaskCollator

from .helpers import FOLDER_CLASSES, make_folder, mini_fashion_mnist, pattern, write_idx


def all_samples(out: Path, split: str, transform=None) -> list[tuple[torch.Tensor, int, str]]:
    transform = transform or eval_transform(16)
    loader = eval_loader(shard_urls(out, split), batch_size=4, transform=transform, num_workers=0)
    return [
        (img, int(lbl), key)
        for imgs, lbls, keys in loader
        for img, lbl, key in zip(to_rgb_uint8(imgs), lbls, keys, strict=True)
    ]


def test_the_unlabeled_split_takes_images_past_the_cap_and_changes_no_other_split(tmp_path):
    src = mini_fashion_mnist(tmp_path / "fm", n_train=100)  # 10 per class
    common = dict(val_fraction=0.25, max_per_class=4, shard_size=8, workers=1, progress=False)
    plain = prepare_fashion_mnist(src, tmp_path / "plain", **common)
    more = prepare_fashion_mnist(src, tmp_path / "more", unlabeled_per_class=3, **common)
    every = prepare_fashion_mnist(src, tmp_path / "every", unlabeled_per_class=None, **common)
    assert "unlabeled" not in plain["splits"] and more["source"]["unlabeled_per_class"] == 3
    assert more["splits"]["unlabeled"]["per_class"] == dict.fromkeys(more["classes"], 3)
    assert every["splits"]["unlabeled"]["count"] == 60  # all 6 per class past the cap of 4

    def sources(out, split):
        import webdataset as wds

        samples = wds.WebDataset(shard_urls(out, split), shardshuffle=False, empty_check=False)
        return [json.loads(sample["json"])["source"] for sample in samples]

    for split in ("train", "val", "test"):  # byte-identical labelled splits with or without it
        assert [s["sha256"] for s in more["splits"][split]["shards"]] == [
            s["sha256"] for s in plain["splits"][split]["shards"]
        ]
    labelled = {x for split in ("train", "val") for x in sources(tmp_path / "more", split)}
    unlabeled = set(sources(tmp_path / "more", "unlabeled"))
    assert (
        len(unlabeled) == 30 and not unlabeled & labelled and unlabeled <= set(sources(tmp_path / "every", "unlabeled"))
    )


def test_image_folder_round_trip(tmp_path):
    src = make_folder(tmp_path / "train")
    make_folder(tmp_path / "val", per_class=2)
    out = tmp_path / "shards"
    m = prepare_image_folder(
        src, out, test_dir=tmp_path / "val", val_fraction=1 / 3, shard_size=4, workers=2, progress=False
    )
    assert m["classes"] == FOLDER_CLASSES
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 12, "val": 6, "test": 6}
    assert m["splits"]["val"]["per_class"] == {"cat": 2, "dog": 2, "eel": 2}
    assert all(Path(out / s["file"]).is_file() for s in m["splits"]["train"]["shards"])
    seen = set()
    for split in ("train", "val"):
        import webdataset as wds

        for sample in wds.WebDataset(shard_urls(out, split), shardshuffle=False, empty_check=False):
            meta = json.loads(sample["json"])
            rel = meta["source"]
            assert rel not in seen
            seen.add(rel)
            assert int(sample["cls"]) == FOLDER_CLASSES.index(rel.split("/")[0]) == meta["label"]
            original = (src / rel).read_bytes()
            assert sample["jpg"] == original  # valid JPEGs are stored unchanged
            assert torch.equal(decode_image(sample["jpg"]), decode_image(original))
    assert len(seen) == 18  # every training image exactly once across train and val
    first_shard = {
        json.loads(s["json"])["label"] for s in wds.WebDataset(shard_urls(out, "train")[0], shardshuffle=False)
    }
    assert len(first_shard) > 1  # shuffled once: shards mix classes


def test_same_input_gives_byte_identical_shards(tmp_path):
    src = make_folder(tmp_path / "train")
    a = prepare_image_folder(src, tmp_path / "a", val_fraction=0.2, shard_size=5, seed=3, workers=2, progress=False)
    b = prepare_image_folder(src, tmp_path / "b", val_fraction=0.2, shard_size=5, seed=3, workers=1, progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.tar"))
    assert files and all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert a["splits"] == b["splits"]
    c = prepare_image_folder(src, tmp_path / "c", val_fraction=0.2, shard_size=5, seed=4, workers=2, progress=False)
    assert c["splits"]["train"]["shards"][0]["sha256"] != a["splits"]["train"]["shards"][0]["sha256"]


def test_bad_inputs_are_converted_or_skipped_and_listed(tmp_path):
    root = make_folder(tmp_path / "train", per_class=2)
    bad = root / "cat"
    good_jpeg = (bad / "img_0.jpg").read_bytes()
    (bad / "zero.jpg").write_bytes(b"")
    (bad / "truncated.jpg").write_bytes(good_jpeg[: len(good_jpeg) // 2])
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4)
    (bad / "text.jpg").write_bytes(b"this is not an image at all")
    (bad / "notes.txt").write_text("a stray file")
    Image.fromarray(pattern(0, 9)).convert("CMYK").save(bad / "cmyk.jpg")
    Image.fromarray((np.arange(24 * 20).reshape(24, 20) * 100).astype(np.uint16)).save(bad / "deep16.png")
    Image.fromarray(pattern(0, 8)).convert("P", palette=Image.Palette.ADAPTIVE).save(bad / "palette.png")
    rgba = np.dstack([pattern(0, 7), np.full((24, 20), 128, np.uint8)])
    Image.fromarray(rgba, "RGBA").save(bad / "alpha.png")
    Image.fromarray(pattern(0, 6)).save(bad / "plain_rgb.png")
    (bad / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (bad / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (bad / "loop").symlink_to(bad, target_is_directory=True)
    (root / ".ipynb_checkpoints").mkdir()
    (root / "empty_class").mkdir()
    warnings = []
    m = prepare_image_folder(
        root, tmp_path / "out", val_fraction=0.0, shard_size=100, workers=2, progress=False, warn=warnings.append
    )
    skipped = {Path(s["path"]).name: s["reason"] for s in m["skipped"]}
    assert skipped["zero.jpg"] == "empty file (0 bytes)"
    assert "truncated" in skipped["truncated.jpg"]
    assert "corrupt" in skipped["corrupt.jpg"] or "not an image" in skipped["corrupt.jpg"]
    assert skipped["text.jpg"].startswith("not an image")
    assert "not an image file" in skipped["notes.txt"]
    assert skipped[".DS_Store"].startswith("hidden file") and skipped[".ipynb_checkpoints"].startswith("hidden")
    assert skipped["gone.jpg"].startswith("broken symlink") and "a loop or a duplicate" in skipped["loop"]
    assert set(skipped) == {
        "zero.jpg", "truncated.jpg", "corrupt.jpg", "text.jpg", "notes.txt",
        ".DS_Store", "gone.jpg", "loop", ".ipynb_checkpoints",
    }  # fmt: skip
    assert any("empty_class" in w for w in m["warnings"]) and any("empty_class" in w for w in warnings)
    samples = all_samples(tmp_path / "out", "train")
    converted = {}
    import webdataset as wds

    for s in wds.WebDataset(shard_urls(tmp_path / "out", "train"), shardshuffle=False):
        meta = json.loads(s["json"])
        if "converted" in meta:
            converted[Path(meta["source"]).name] = (meta["converted"], s)
    assert set(converted) == {"cmyk.jpg", "deep16.png", "palette.png", "alpha.png"}
    assert "CMYK" in converted["cmyk.jpg"][0] and "8-bit" in converted["deep16.png"][0]
    assert "alpha" in converted["alpha.png"][0] and "palette" in converted["palette.png"][0]
    deep = cv2.imdecode(np.frombuffer(converted["deep16.png"][1]["png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert deep.dtype == np.uint8 and deep.ndim == 2 and deep.max() > 100
    assert len(samples) == 2 * 3 + 5 and all(img.shape[0] == 3 for img, _, _ in samples)  # plain_rgb.png kept
    assert m["splits"]["train"]["converted"] == 4


def test_split_without_usable_images_is_an_error_and_keeps_old_output(tmp_path):
    good = make_folder(tmp_path / "good", per_class=2)
    out = tmp_path / "out"
    prepare_image_folder(good, out, val_fraction=0.0, workers=1, progress=False)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    broken = tmp_path / "broken"
    for name in FOLDER_CLASSES:
        (broken / name).mkdir(parents=True)
        (broken / name / "x.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="split 'train' has no usable image"):
        prepare_image_folder(broken, out, val_fraction=0.0, workers=1, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        prepare_image_folder(tmp_path / "nowhere", out, progress=False)


@pytest.mark.parametrize("shard_size", [3, 100])  # many shards (dealt to readers) and one shard (sample split)
def test_eval_loader_two_ranks_two_workers_every_sample_once(tmp_path, shard_size):
    src = make_folder(tmp_path / "train", per_class=7)
    out = tmp_path / "shards"
    prepare_image_folder(src, out, val_fraction=0.0, shard_size=shard_size, workers=1, progress=False)
    urls = shard_urls(out, "train")
    keys = []
    for rank in range(2):
        loader = eval_loader(urls, batch_size=3, transform=eval_transform(16), rank=rank, world_size=2, num_workers=2)
        for imgs, _labels, ks in loader:
            assert imgs.shape[1:] == (16, 16, 3) and imgs.dtype == torch.uint8  # normalised on the device
            keys += ks
    assert sorted(keys) == [f"{i:08d}" for i in range(21)]


def test_pretrain_loader_fixed_epochs_per_rank_and_deterministic(tmp_path):
    src = make_folder(tmp_path / "train", per_class=8)
    out = tmp_path / "shards"
    prepare_image_folder(src, out, val_fraction=0.0, shard_size=4, workers=1, progress=False)
    urls = shard_urls(out, "train")
    kw = dict(enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), npred=4, min_keep=4)

    def epoch(rank, ep, workers=2):
        coll = MultiBlockMaskCollator(32, 4, rank=rank, **kw)
        coll.set_start_step(ep * 5)
        loader = pretrain_loader(
            urls,
            batch_size=4,
            collator=coll,
            transform=pretrain_transform(32),
            batches_per_epoch=5,
            epoch=ep,
            seed=1,
            rank=rank,
            world_size=2,
            num_workers=workers,
            shuffle_buffer=8,
        )
        batches = list(loader)
        for i, ((imgs, _), enc, pred) in enumerate(batches):  # masks drawn at the batch's global step
            ref_enc, ref_pred = coll.sample(4, ep * 5 + i)
            assert torch.equal(enc[0], ref_enc[0]) and torch.equal(pred[3], ref_pred[3])
            assert imgs.shape == (4, 32, 32, 3)
        return batches

    r0, r1 = epoch(0, 0), epoch(1, 0)
    assert len(r0) == len(r1) == 5  # every rank the same number of batches
    again = epoch(0, 0)
    assert all(torch.equal(a[0][0], b[0][0]) for a, b in zip(r0, again, strict=True))
    other = epoch(0, 1)
    assert not all(torch.equal(a[0][1], b[0][1]) for a, b in zip(r0, other, strict=True))


def test_fashion_mnist_idx_source(tmp_path):
    src = mini_fashion_mnist(tmp_path / "fm")
    m = prepare_fashion_mnist(src, tmp_path / "out", val_fraction=0.25, shard_size=8, workers=1, progress=False)
    assert {k: v["count"] for k, v in m["splits"].items()} == {"train": 30, "val": 10, "test": 20}
    assert m["classes"][0] == "T-shirt/top" and m["image_sizes"]["most_common"] == {"28x28": 60}
    img, _, _ = all_samples(tmp_path / "out", "test", transform=eval_transform(28))[0]
    assert img.dtype == torch.uint8
    assert img.shape == (3, 28, 28) and torch.equal(img[0], img[1])  # grey replicated to 3 channels
    assert read_manifest(tmp_path / "out")["source"]["kind"] == "fashion_mnist"
    assert find_fashion_mnist(src) == src


def test_transforms_and_normalize():
    import random

    arr = np.zeros((30, 40, 3), np.uint8)
    arr[..., 2] = 255  # red, in OpenCV's BGR order
    arr[:, :20, 1] = 255  # left half yellow
    out = to_rgb_uint8(build_batch([arr], eval_transform(16, 20)))[0]
    assert out.shape == (3, 16, 16) and out[0].min() == 255 and out[2].max() == 0  # RGB after conversion
    rng = random.Random(0)
    tf = pretrain_transform(16, crop_scale=(0.3, 1.0), horizontal_flip=True)
    for _ in range(20):
        top, left, h, w = tf.crop_params(rng, 30, 40)
        assert 0 <= top <= 30 - h and 0 <= left <= 40 - w and 0.3 * 1200 * 0.9 <= h * w <= 1200
    flips = {int(build_batch([arr], tf, random.Random(i))[0, 8, 0, 1]) for i in range(12)}
    assert flips == {0, 255}  # the yellow half lands on either side
    colour = build_batch([arr], pretrain_transform(16, color_distortion=True, gaussian_blur=True), rng)
    assert colour.shape == (1, 16, 16, 3) and colour.dtype == torch.uint8
    white = torch.full((2, 4, 4, 3), 255, dtype=torch.uint8)
    white[..., 0] = 0  # no blue
    norm = Normalize()(white)
    assert norm.shape == (2, 3, 4, 4) and norm.dtype == torch.float32
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(norm[0, :, 0, 0], (torch.tensor([1.0, 1.0, 0.0]) - mean) / std)
    with pytest.raises(ValueError, match="crop_scale"):
        pretrain_transform(16, crop_scale=(0.5, 1.5))


def test_fashion_mnist_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="make setup.*dataset-fashion-mnist"):
        find_fashion_mnist(tmp_path / "missing")
    src = mini_fashion_mnist(tmp_path / "fm")
    write_idx(src / "train-labels-idx1-ubyte.gz", np.zeros(5), 2051)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz: idx magic number 2051, expected 2049"):
        prepare_fashion_mnist(src, tmp_path / "out", progress=False)
    with pytest.raises(FileNotFoundError, match="run the prepare stage first"):
        read_manifest(tmp_path / "never")


def test_tario_reads_what_webdataset_reads_and_slices_by_seeking(tmp_path):
    import io
    import tarfile

    import webdataset as wds

    from ijepa.data.tario import ShardError, count_samples, read_samples

    src = make_folder(tmp_path / "train", per_class=5)
    prepare_image_folder(src, tmp_path / "out", val_fraction=0.0, shard_size=100, workers=1, progress=False)
    (url,) = shard_urls(tmp_path / "out", "train")
    ref = list(wds.tarfile_to_samples(handler=wds.reraise_exception)(iter([{"url": url}])))
    ours = list(read_samples(url))
    assert len(ours) == len(ref) == count_samples(url) == 15
    assert all(
        a == {k: b[k] for k in a} and a.keys() == b.keys() - {"__local_path__"} for a, b in zip(ours, ref, strict=True)
    )
    assert [s["__key__"] for s in read_samples(url, 4, 7)] == [s["__key__"] for s in ref[4:7]]
    # a foreign shard: a PAX long name, a directory and upper-case extensions follow webdataset's rules
    foreign = tmp_path / "foreign.tar"
    with tarfile.open(foreign, "w", format=tarfile.PAX_FORMAT) as tar:
        d = tarfile.TarInfo("sub")
        d.type = tarfile.DIRTYPE
        tar.addfile(d)
        for name, data in ((f"sub/{'x' * 120}.JPG", b"img"), (f"sub/{'x' * 120}.cls", b"2"), ("sub/b.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(read_samples(str(foreign)))
    assert [(s["__key__"], sorted(k for k in s if not k.startswith("__"))) for s in got] == [
        (f"sub/{'x' * 120}", ["cls", "jpg"]),
        ("sub/b", ["cls"]),
    ]
    broken = tmp_path / "broken.tar"
    broken.write_bytes(Path(url).read_bytes()[:1000])
    with pytest.raises(ShardError, match="broken.tar"):
        list(read_samples(str(broken)))


def test_pretrain_ranks_hold_equal_images_and_shards_are_drawn_by_size(tmp_path):
    """Shards of 1000/1000/50 images: two ranks hold 1025 each, and the short shard's images come up as
    often as any others (drawn by size, not once per shard)."""
    import collections

    from ijepa.data.loaders import RankShards, rank_pieces

    urls, counts = ["a.tar", "b.tar", "c.tar"], [1000, 1000, 50]
    pieces = [rank_pieces(urls, counts, r, 2) for r in range(2)]
    assert [sum(p["stop"] - p["start"] for p in ps) for ps in pieces] == [1025, 1025]
    assert pieces[1] == [{"url": "b.tar", "start": 25, "stop": 1000}, {"url": "c.tar", "start": 0, "stop": 50}]
    assert [sum(p["stop"] - p["start"] for p in rank_pieces(urls, counts, r, 3)) for r in range(3)] == [683, 683, 684]
    draws = collections.Counter()
    for piece in itertools.islice(iter(RankShards(pieces[1], 1, seed=0, epoch=0)), 20000):
        draws[piece["url"]] += 1
    per_image = {u: draws[u] / n for u, n in (("b.tar", 975), ("c.tar", 50))}
    assert 0.85 < per_image["c.tar"] / per_image["b.tar"] < 1.15  # the old rule drew c.tar 19.5x too often


def test_rand_augment_has_timms_strength_and_erasing_mae_s():
    """rand-m9-mstd0.5: ops at 9/10 of their range on average (torchvision's magnitude=9 is 9/30)."""
    from torchvision.transforms import v2

    from ijepa.data.augment import TimmRandAugment, random_erasing

    torch.manual_seed(0)
    ra = TimmRandAugment(9)
    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    bins = []
    for _ in range(400):
        ra(img)
        bins.append(ra.magnitude)
    bins = torch.tensor(bins, dtype=torch.float64)
    assert abs(bins.mean() - 90) < 1.0 and 4.0 < bins.std() < 6.0  # N(9, 0.5) on timm's 0-10 scale
    space = ra._AUGMENTATION_SPACE
    assert float(space["Rotate"][0](ra.num_magnitude_bins, 32, 32)[90]) == pytest.approx(27.0)  # timm: 30 x 0.9
    assert float(space["ShearX"][0](ra.num_magnitude_bins, 32, 32)[90]) == pytest.approx(0.27)
    torchvision_m9 = v2.RandAugment(magnitude=9)
    assert float(space["Rotate"][0](torchvision_m9.num_magnitude_bins, 32, 32)[9]) == pytest.approx(9.0)
    with pytest.raises(ValueError, match="0-10"):
        TimmRandAugment(15)
    x = torch.zeros((400, 3, 20, 20))
    random_erasing(x, 0.25)
    erased = (x != 0).flatten(1).any(1).float()
    assert 0.18 < erased.mean() < 0.32  # MAE's reprob 0.25
    area = (x[erased.bool()] != 0).all(1).flatten(1).float().mean(1)
    assert area.min() >= 0.015 and area.max() <= 0.34  # one box of 2-33% of the image
    assert torch.equal(random_erasing(torch.ones(4, 3, 8, 8), 0.0), torch.ones(4, 3, 8, 8))


def test_batch_slots_are_reused_yet_never_overwrite_a_batch_still_held(tmp_path):
    """Workers write batches into a few reused shared-memory slots: a consumer that copies each batch and drops
    it gets its batches in slots; one that keeps every batch gets byte-identical batches (the workers fall
    back to fresh buffers once every slot is held), for the pretraining and the evaluation loader."""
    src = make_folder(tmp_path / "train", per_class=8)
    out = tmp_path / "shards"
    prepare_image_folder(src, out, val_fraction=0.0, shard_size=5, workers=1, progress=False)
    urls = shard_urls(out, "train")
    n = 16
    loader = pretrain_loader(
        urls, batch_size=4, collator=None, transform=pretrain_transform(16), batches_per_epoch=n, epoch=0
    )
    copied = [(imgs.clone(), labels) for imgs, labels in loader]
    assert loader.slots.pooled >= n // 2  # most batches came in a reused slot
    kept = list(loader)  # the same epoch again, every batch held
    assert len(kept) == len(copied) == n
    for (a, la), (b, lb) in zip(copied, kept, strict=True):
        assert torch.equal(a, b) and torch.equal(la, lb) and la.dtype == torch.int64
    workers, slots = loader.slots.shape
    assert loader.slots.pooled <= workers * slots  # nothing released: slots filled once, then fresh buffers

    ev = eval_loader(urls, batch_size=3, transform=eval_transform(16), num_workers=2)
    copied = [(imgs.clone(), keys) for imgs, _, keys in ev]
    kept = [(imgs, keys) for imgs, _, keys in ev]
    assert sorted(k for _, ks in kept for k in ks) == [f"{i:08d}" for i in range(24)]
    assert all(torch.equal(a, b) and ka == kb for (a, ka), (b, kb) in zip(copied, kept, strict=True))


def test_resize_halves_before_bilinear_where_bilinear_would_alias():
    from ijepa.data.transforms import halve, resize_into

    rng = np.random.default_rng(0)
    src = rng.integers(0, 256, (9, 13, 3), dtype=np.uint8)
    pairs = (src[:, 0:12:2].astype(int) + src[:, 1:12:2] + 1) // 2  # exact means of pixel pairs
    assert np.array_equal(halve(src, 1), pairs)
    assert np.array_equal(halve(src, 0), (src[0:8:2].astype(int) + src[1:8:2] + 1) // 2)

    out = np.empty((16, 16, 3), np.uint8)
    small = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)  # under 2x: bilinear as it is
    resize_into(small, out)
    assert np.array_equal(out, cv2.resize(small, (16, 16), interpolation=cv2.INTER_LINEAR))

    stripes = np.zeros((30, 36, 3), np.uint8)  # 1-px vertical stripes, 2.25x wider than the output
    stripes[:, ::2] = 255
    resize_into(stripes, out)
    plain = cv2.resize(stripes, (16, 16), interpolation=cv2.INTER_LINEAR)
    area = cv2.resize(stripes, (16, 16), interpolation=cv2.INTER_AREA)
    assert plain.std() > 50  # bilinear alone aliases the stripes into bands
    assert out.std() < 2 and abs(float(out.mean()) - float(area.mean())) < 2  # the flat grey INTER_AREA gives

    smooth = cv2.GaussianBlur(rng.integers(0, 256, (100, 90, 3), dtype=np.uint8), (0, 0), 3)
    resize_into(smooth, out)  # 5-6x in both axes: two 2 x 2 halvings, then bilinear
    ref = cv2.resize(smooth, (16, 16), interpolation=cv2.INTER_AREA)
    assert np.abs(out.astype(int) - ref).mean() < 1.5


FORK_SAFETY = """
import sys
import cv2, numpy as np, torch
from ijepa.data import eval_loader, eval_transform, pretrain_loader, pretrain_transform, shard_urls
from ijepa.masks import MultiBlockMaskCollator

urls = shard_urls(sys.argv[1], "train")
cv2.setNumThreads(4)
torch.set_num_threads(4)
big = np.random.default_rng(0).integers(0, 255, (1500, 1500, 3), dtype=np.uint8)
for rep in range(4):
    cv2.resize(big, (1100, 1100)), cv2.GaussianBlur(big, (9, 9), 2)  # OpenCV's thread pool, busy
    torch.randn(384, 384) @ torch.randn(384, 384)  # torch's intra-op threads
    coll = MultiBlockMaskCollator(32, 4)
    coll.set_start_step(0)
    loader = pretrain_loader(urls, batch_size=4, collator=coll, transform=pretrain_transform(32),
                             batches_per_epoch=6, epoch=rep, num_workers=4, shuffle_buffer=8)
    n = sum(1 for _ in loader)
    m = sum(len(keys) for _, _, keys in eval_loader(urls, batch_size=4, transform=eval_transform(16), num_workers=3))
    print("pass", rep, n, m, flush=True)
"""


@pytest.mark.process
def test_loaders_do_not_hang_after_the_parent_used_opencv_and_torch_threads(tmp_path):
    """Workers forked from a process whose OpenCV thread pool had run hung forever in their first OpenCV call
    (a lock held at fork time); they now start from a fork server. Repeated passes in a fresh interpreter that
    keeps OpenCV's and torch's pools busy between them, under a timeout."""
    src = make_folder(tmp_path / "train", per_class=8)
    prepare_image_folder(src, tmp_path / "shards", val_fraction=0.0, shard_size=4, workers=1, progress=False)
    root = Path(__file__).resolve().parents[1]
    try:
        r = subprocess.run(
            [sys.executable, "-W", "ignore", "-c", FORK_SAFETY, str(tmp_path / "shards")],
            cwd=root, env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True, text=True, timeout=90,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the loaders hung; printed before that: {e.stdout!r}")
    assert r.returncode == 0, r.stderr
    assert r.stdout.split("\n")[:-1] == [f"pass {i} 6 24" for i in range(4)]


@pytest.mark.process
def test_a_module_run_with_dash_m_starts_workers_without_runpy_warnings(tmp_path):
    """Stages run as ``python -m stages.<name>``; each worker runs that module again as ``__mp_main__``. The
    fork server once imported the module itself, and every worker printed runpy's RuntimeWarning ("found in
    sys.modules ... may result in unpredictable behaviour"); it now imports what the module imports."""
    pkg = tmp_path / "demo_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "stage.py").write_text(
        "from ijepa.data.shards import prepare_image_folder  # noqa: F401 (an import the server preloads)\n"
        "from ijepa.data.workers import worker_context\n\n"
        "def square(x):\n    return x * x\n\n"
        "if __name__ == '__main__':\n"
        "    with worker_context().Pool(2) as pool:\n        print(pool.map(square, range(4)))\n"
    )
    root = Path(__file__).resolve().parents[1]
    r = subprocess.run(
        [sys.executable, "-m", "demo_pkg.stage"], cwd=tmp_path, env={**os.environ, "PYTHONPATH": f"{root}:{tmp_path}"},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout == "[0, 1, 4, 9]\n"
    assert "RuntimeWarning" not in r.stderr, r.stderr


class StuckTransform:
    """An eval transform whose decode never finishes in time (a hung file system, say)."""

    crop_size = 16

    def apply(self, arr, out, rng=None):
        time.sleep(2.5)


def test_a_stalled_loader_stops_with_one_line_naming_its_workers(tmp_path):
    src = make_folder(tmp_path / "train", per_class=4)
    prepare_image_folder(src, tmp_path / "shards", val_fraction=0.0, shard_size=4, workers=1, progress=False)
    urls = shard_urls(tmp_path / "shards", "train")
    loader = eval_loader(
        urls, batch_size=1, transform=StuckTransform(), num_workers=2, stall_timeout=1.5, name="extract loader (test)"
    )
    with pytest.raises(LoaderStalled) as e:
        list(loader)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("extract loader (test): no batch in 1.5 s (the stall timeout) from 2")
    for w in (0, 1):  # each worker: its pid, its state, one batch begun (stuck in it)
        assert re.search(rf"worker {w} \(pid \d+, sleeping, [\d.]+ s CPU\): 1 begun, the last [12] s ago", msg), msg
    assert isinstance(e.value, UserError)  # a stage prints it as one line

    stuck = pretrain_transform(16)
    stuck.apply = StuckTransform().apply
    loader = pretrain_loader(
        urls, batch_size=1, collator=None, transform=stuck, batches_per_epoch=3, epoch=0, num_workers=1,
        stall_timeout=1.0,
    )  # fmt: skip
    with pytest.raises(LoaderStalled, match=r"^pretrain loader: no batch in 1 s .* from 1 worker\(s\) \[worker 0 "):
        list(loader)


def test_splits_too_small_are_refused_before_writing(tmp_path):
    src = make_folder(tmp_path / "train", per_class=5)
    out = tmp_path / "shards"
    prepare_image_folder(src, out, val_fraction=0.2, shard_size=4, workers=1, progress=False)  # 1 val per class
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(SplitTooSmall, match=r"^split 'val' would get 0 images per class for 3 of 3 classes") as e:
        prepare_image_folder(src, out, val_fraction=0.05, shard_size=4, workers=1, progress=False)
    assert e.value.setting == "val_fraction" and "raise it to at least 0.2 for one image per class" in str(e.value)
    with pytest.raises(SplitTooSmall, match=r"^split 'train' would get 0 images .* lower it below 0.9"):
        prepare_image_folder(src, out, val_fraction=0.95, shard_size=4, workers=1, progress=False)
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # nothing written
