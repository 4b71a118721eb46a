"""The attentive probe on tokens computed on the fly (extract.tokens: false): the same tokens as the cache, the
same probes within noise, resumed bit-exact after a stop, and 2 gloo ranks equal to one process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from ijepa.data import eval_loader, eval_transform, prepare_image_folder, pretrain_loader, read_manifest, shard_urls
from ijepa.data.transforms import Normalize
from ijepa.distributed import shutdown
from ijepa.eval.attentive import train_attentive_probe
from ijepa.eval.attentive_stream import batch_tokens, train_attentive_probes_streaming
from ijepa.eval.features import extract_features
from ijepa.models.vit import VisionTransformer
from pipeline.resume import RESUME_DIR, EpochState

from .helpers import free_port, join_gloo, make_folder

CROP, PATCH = 16, 4
CPU = torch.device("cpu")
PROBE = dict(lrs=[0.003, 0.01], num_heads=2, epochs=4, weight_decay=0.01, warmup_epochs=1, seed=0)


def encoders() -> dict:
    torch.manual_seed(0)
    enc = VisionTransformer(img_size=[CROP], patch_size=PATCH, embed_dim=32, depth=2, num_heads=2).eval()
    return {"pretrained": enc, "pixels": None}


def shards(root: Path) -> Path:
    out = root / "shards"
    if not out.exists():
        make_folder(root / "train", per_class=24)
        make_folder(root / "test", per_class=6)
        prepare_image_folder(
            root / "train", out, test_dir=root / "test", val_fraction=0.25, shard_size=10, workers=1, progress=False
        )
    return out


def streamed(out: Path, batch: int = 9, **kw) -> dict | None:
    manifest = read_manifest(out)
    train = manifest["splits"]["train"]
    tf = eval_transform(CROP)
    return train_attentive_probes_streaming(
        encoders(),
        train_batches=lambda epoch: pretrain_loader(
            shard_urls(out, "train"), batch_size=batch, collator=None, transform=tf, batches_per_epoch=54 // batch,
            epoch=epoch, num_workers=0, counts=[s["count"] for s in train["shards"]],
        ),
        eval_batches=lambda split: eval_loader(shard_urls(out, split), batch_size=16, transform=tf, num_workers=0),
        eval_splits=["val", "test"], prepare=Normalize(), num_classes=3, steps_per_epoch=54 // batch, **PROBE | kw,
    )  # fmt: skip


def test_streamed_tokens_are_the_cache_s_and_the_probes_agree(tmp_path):
    out = shards(tmp_path)
    assert {s: v["count"] for s, v in read_manifest(out)["splits"].items()} == {"train": 54, "val": 18, "test": 18}
    cache = {}
    for split in ("train", "val", "test"):
        loader = eval_loader(shard_urls(out, split), batch_size=16, transform=eval_transform(CROP), num_workers=0)
        enc = {"pretrained": encoders()["pretrained"]}
        cache[split] = extract_features(enc, loader, prepare=Normalize(), device=CPU, pixel_size=4, tokens=True)
    # the very tokens the probes train on: the cache's float16 tokens, standardised
    images, _, keys = next(iter(eval_loader(shard_urls(out, "val"), batch_size=5, transform=eval_transform(CROP))))
    toks = batch_tokens(encoders(), Normalize()(images), PATCH, CPU, bf16=False)
    rows = [cache["val"]["pretrained"]["keys"].index(k) for k in keys]
    for name in ("pretrained", "pixels"):
        ref = cache["val"][name]["tokens"][rows].float()
        torch.testing.assert_close(toks[name], torch.nn.functional.layer_norm(ref, (ref.shape[-1],), eps=1e-6))

    stream = streamed(out)
    for name in ("pretrained", "pixels"):
        cached = train_attentive_probe(
            {s: cache[s][name]["tokens"] for s in cache}, {s: cache[s][name]["labels"] for s in cache},
            num_classes=3, batch_size=9, **PROBE,
        )  # fmt: skip
        assert stream[name]["num_heads"] == cached["num_heads"]
        assert [r["lr"] for r in stream[name]["table"]] == PROBE["lrs"]
        # the same probes on the same tokens, images met in another order: within noise of 18 images each
        for a, b in zip(stream[name]["table"], cached["table"], strict=True):
            assert abs(a["val_top1"] - b["val_top1"]) <= 3 / 18 and abs(a["test_top1"] - b["test_top1"]) <= 3 / 18
        assert stream[name]["test_top1"] > 0.6  # class-coloured images: far above chance (1/3)


def test_a_stopped_run_resumes_to_the_uninterrupted_result(tmp_path):
    """The streaming probe takes the stages' one resume policy (``pipeline.resume.EpochState``): a stopped run
    resumes bit-exact; a state saved under other params is set aside, never resumed from nor overwritten."""
    out, saved = shards(tmp_path), tmp_path / RESUME_DIR
    whole = streamed(out, state=EpochState(tmp_path, "whole", "k"))
    stopped = streamed(out, state=EpochState(tmp_path, "resume", "k"), should_stop=lambda: True)
    assert stopped is None  # stopped after the first epoch, its probes saved
    assert torch.load(saved / "resume.pt", weights_only=True)["state"]["epochs_done"] == 1
    resumed = streamed(out, state=EpochState(tmp_path, "resume", "k"))
    assert resumed == whole  # bit-exact on the CPU
    a, b = (torch.load(saved / f, weights_only=True)["state"]["probes"] for f in ("whole.pt", "resume.pt"))
    for (pa, _), (pb, _) in zip(a["pretrained"], b["pretrained"], strict=True):
        assert all(torch.equal(pa[k], pb[k]) for k in pa)
    # another key (other params, checkpoint or shards): the file is set aside as it was, and training starts over
    before = (saved / "resume.pt").read_bytes()
    assert streamed(out, state=EpochState(tmp_path, "resume", "other"), epochs=1) == streamed(out, epochs=1)
    stale = list(saved.glob("resume.pt.stale-*"))
    assert len(stale) == 1 and stale[0].read_bytes() == before
    assert streamed(out, epochs=1) != whole


# -- two gloo ranks, each half of every global batch = one process over the whole batches -------------------


def _ranks(rank: int, world: int, port: int, out: str) -> None:
    join_gloo(rank, world, port)
    res = _fixed_batches(rank, world, Path(out))
    Path(out, f"result-{rank}.json").write_text(json.dumps(res))
    shutdown()


def _fixed_batches(rank: int, world: int, out: Path) -> dict:
    g = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (3, 8, CROP, CROP, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (3, 8), generator=g)
    val = torch.randint(0, 256, (10, CROP, CROP, 3), dtype=torch.uint8, generator=g), torch.arange(10) % 3
    share = 8 // world
    mine = slice(rank * share, (rank + 1) * share)
    return train_attentive_probes_streaming(
        encoders(),
        train_batches=lambda epoch: ((images[s, mine], labels[s, mine]) for s in range(3)),
        eval_batches=lambda split: [(val[0][rank::world], val[1][rank::world], [])],
        eval_splits=["val"], prepare=Normalize(), num_classes=3, steps_per_epoch=3,
        state=EpochState(out, "state", "k", is_main=rank == 0), **PROBE | {"epochs": 2},
    )  # fmt: skip


@pytest.mark.process
def test_two_gloo_ranks_equal_one_process(tmp_path):
    (tmp_path / "ddp").mkdir()
    mp.spawn(_ranks, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    (tmp_path / "one").mkdir()
    single = _fixed_batches(0, 1, tmp_path / "one")
    ranks = [json.loads((tmp_path / f"ddp/result-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # evaluation counts summed over the ranks' shares: one result everywhere
    for name in ("pretrained", "pixels"):
        for a, b in zip(ranks[0][name]["table"], single[name]["table"], strict=True):
            assert a["val_top1"] == b["val_top1"]
    a, b = (
        torch.load(tmp_path / d / RESUME_DIR / "state.pt", weights_only=True)["state"]["probes"] for d in ("ddp", "one")
    )
    for name in a:
        for (pa, _), (pb, _) in zip(a[name], b[name], strict=True):
            for k in pa:
                torch.testing.assert_close(pa[k], pb[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
