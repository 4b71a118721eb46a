"""Distributed downstream stages on real 2-process gloo: finetune (DDP) equals one process over the combined
batch, segmentation heads train in step on both ranks over disjoint shares, extraction across ranks writes
the features one process writes, and the finetune stage runs end to end as two submitit tasks."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.multiprocessing as mp

from ijepa.data.transforms import Normalize
from ijepa.distributed import ddp, shutdown
from ijepa.finetune import Classifier, FinetuneSpec, Preprocess, fit_head, load_classifier, train_classifier
from ijepa.models.vit import VisionTransformer
from ijepa.seg.data import SegDataset, seg_loader
from ijepa.seg.model import SegmentationModel
from ijepa.seg.train import SegTrainSpec, train_segmentation
from pipeline import launch
from pipeline.params import section
from pipeline.stage import StageJob, run_stage
from stages import extract
from stages import pretrain as pretrain_stage

from .helpers import SEG_CLASSES, free_port, join_gloo, seg_scenes, shard_project

pytestmark = pytest.mark.process

FULL, STEPS = 8, 3


# -- finetune: DDP + gradient accumulation = one process over the combined batch ---------------------------


def _finetune(rank: int, world: int, out: Path) -> dict:
    torch.manual_seed(0)
    model = Classifier(VisionTransformer(img_size=[16], patch_size=4, embed_dim=32, depth=2, num_heads=2), 3)
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (STEPS, FULL, 16, 16, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 3, (STEPS, FULL), generator=g)
    val = torch.randint(0, 256, (10, 16, 16, 3), dtype=torch.uint8, generator=g), torch.arange(10) % 3
    accum = 2 if world > 1 else 1  # 2 ranks x 2 micro-batches of 2 = one batch of 8
    micro = FULL // (world * accum)

    def train_batches(epoch):
        for step in range(STEPS):
            mine = torch.arange(FULL)[rank * micro * accum : (rank + 1) * micro * accum]
            for m in range(accum):
                idx = mine[m * micro : (m + 1) * micro]
                yield images[step, idx], labels[step, idx]

    def eval_batches(split):  # this rank's share of the split
        yield val[0][rank::world], val[1][rank::world], [str(i) for i in range(rank, 10, world)]

    spec = FinetuneSpec(
        epochs=1, batch_size=micro, accum_steps=accum, blr=0.05, warmup_epochs=0.3, mixup=0.0, cutmix=0.0,
        random_erasing=0.0, bf16=False,
    )  # fmt: skip
    train0 = images[0][rank::world], labels[0][rank::world], [str(i) for i in range(rank, FULL, world)]
    fit = fit_head(model, [train0], prepare=Normalize(), device=torch.device("cpu"), steps=5, lr=0.05)  # LP-FT
    result = train_classifier(
        ddp(model, torch.device("cpu")), spec, steps_per_epoch=STEPS, train_batches=train_batches,
        eval_batches=eval_batches, prepare=Normalize(), device=torch.device("cpu"), best_path=out / "clf.pth",
        class_names=["a", "b", "c"], preprocess=Preprocess(16, 16), world_size=world, is_main=rank == 0,
    )  # fmt: skip
    return {k: result[k] for k in ("val_top1", "lr", "steps")} | {"loss": result["history"][-1]["train_loss"], **fit}


def _finetune_worker(rank: int, world: int, port: int, out: str) -> None:
    join_gloo(rank, world, port)
    res = _finetune(rank, world, Path(out))
    Path(out, f"result-{rank}.json").write_text(json.dumps(res))
    shutdown()


def test_finetune_two_gloo_ranks_equal_one_process_over_the_combined_batch(tmp_path):
    (tmp_path / "ddp").mkdir()
    mp.spawn(_finetune_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    (tmp_path / "one").mkdir()
    single = _finetune(0, 1, tmp_path / "one")
    ranks = [json.loads((tmp_path / f"ddp/result-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]  # losses and accuracies averaged over ranks: one decision everywhere
    assert ranks[0]["lr"] == single["lr"] and ranks[0]["steps"] == single["steps"] == STEPS
    assert abs(ranks[0]["loss"] - single["loss"]) < 1e-5 and ranks[0]["val_top1"] == single["val_top1"]
    assert ranks[0]["train_top1"] == single["train_top1"]  # the LP-FT head fit: gradients summed over ranks
    assert abs(ranks[0]["train_loss"] - single["train_loss"]) < 1e-5
    a, _, _ = load_classifier(tmp_path / "ddp/clf.pth")
    b, _, _ = load_classifier(tmp_path / "one/clf.pth")
    init = Classifier(VisionTransformer(img_size=[16], patch_size=4, embed_dim=32, depth=2, num_heads=2), 3)
    moved = 0
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)
        moved += not torch.equal(y, init.state_dict()[name])
    assert moved > 10  # training changed the weights


# -- segmentation: disjoint shares of every global batch, both ranks in step -------------------------------


def test_seg_loader_shares_are_one_process_batch_split(tmp_path):
    seg_scenes(tmp_path / "train", 20, 0)
    ds = SegDataset(tmp_path / "train", SEG_CLASSES, "color", (24, 40), train=False)
    keys = {}
    for world, batch in ((1, 8), (2, 4)):
        for rank in range(world):
            loader = seg_loader(ds, batch, 0, True, seed=3, rank=rank, world_size=world)
            loader.sampler.set_epoch(1)
            keys[(world, rank)] = [list(b) for b in loader.batch_sampler]
    one, r0, r1 = keys[(1, 0)], keys[(2, 0)], keys[(2, 1)]
    assert len(one) == len(r0) == len(r1) == 2  # 20 images: 2 full batches of 8 (the tail is dropped)
    for i in range(2):
        assert set(r0[i]).isdisjoint(r1[i]) and set(r0[i]) | set(r1[i]) == set(one[i])


def _seg_worker(rank: int, world: int, port: int, folder: str) -> None:
    join_gloo(rank, world, port)
    torch.manual_seed(rank)  # different initial weights: DDP must start every rank from rank 0's
    enc = VisionTransformer(img_size=[8], patch_size=4, embed_dim=32, depth=2, num_heads=2)
    model = SegmentationModel(enc, 3, head="decoder", freeze_encoder=False)
    ds = SegDataset(Path(folder) / "train", SEG_CLASSES, "color", (24, 40), train=True, scale=(0.75, 1.25))
    spec = SegTrainSpec(epochs=2, batch_size=4, lr=3e-3, warmup_epochs=0.5, num_workers=0, bf16=False)
    history = train_segmentation(model, ds, spec, torch.device("cpu"), seed=0, rank=rank, world_size=world)
    torch.save({"state": model.state_dict(), "history": history}, Path(folder) / f"seg-{rank}.pt")
    shutdown()


def test_seg_training_two_gloo_ranks_stay_in_step(tmp_path):
    seg_scenes(tmp_path / "train", 16, 0)
    mp.spawn(_seg_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"seg-{r}.pt", weights_only=True) for r in (0, 1))
    assert a["history"] == b["history"] and len(a["history"]) == 2  # the loss logged is the ranks' mean
    for name, t in a["state"].items():
        assert torch.equal(t, b["state"][name]), name


# -- stages under two ranks: extract writes what one process writes; finetune runs end to end -------------


def _stage_worker(rank: int, world: int, port: int, root: str, stage: str) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    module = {"extract": extract}[stage]
    params = json.loads(Path(root, "params.json").read_text())
    run_stage(stage, module.run, module.SECTIONS, root=root, params=params)


def test_extract_and_finetune_stages_under_two_ranks(tmp_path):
    root, params = shard_project(tmp_path / "p", epochs=1)
    run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    params["extract"] |= {"bf16": False, "num_workers": 0, "batch_size": 16}
    params["finetune"] |= {"epochs": 1, "batch_size": 8, "num_workers": 0, "bf16": False}
    (root / "params.json").write_text(json.dumps(params))
    run_stage("extract", extract.run, extract.SECTIONS, root=root, params=params)
    shutil.move(root / "data/features", tmp_path / "single")
    mp.spawn(_stage_worker, args=(2, free_port(), str(root), "extract"), nprocs=2, join=True)
    for name in ("pretrained", "random_init", "pixels", "tokens_pretrained"):
        one = torch.load(tmp_path / f"single/{name}.pt", weights_only=True)
        two = torch.load(root / f"data/features/{name}.pt", weights_only=True)
        for split in ("train", "val", "test"):
            assert two[split]["keys"] == one[split]["keys"] and len(set(one[split]["keys"])) == len(one[split]["keys"])
            for k, t in one[split].items():
                if isinstance(t, torch.Tensor):
                    torch.testing.assert_close(two[split][k], t, rtol=1e-4, atol=1e-4, msg=f"{name} {split} {k}")
    assert json.loads((root / "metrics/extract.json").read_text())["train_samples"] == 180

    # finetune through the submitit launcher (`make stage-slurm STAGE=finetune`), 2 local tasks, preempted (USR2,
    # what SLURM sends before the time limit) once its first epoch is saved: it stops at the epoch end, requeues
    # itself and the requeued job resumes from there
    params["finetune"]["epochs"] = 3
    (root / "params.json").write_text(json.dumps(params))
    lp = dataclasses.replace(section(params, "launcher"), kind="local", tasks_per_node=2, max_requeues=2)
    job = launch.make_executor(lp, tmp_path / "logs", "finetune").submit(StageJob(str(root), params, "finetune"))
    state = root / "models/resume/finetune.pt"
    deadline = time.monotonic() + 240
    while not state.exists():
        assert time.monotonic() < deadline and not job.done(), "finetune saved no epoch"
        time.sleep(0.05)
    # what submitit's local controller (and SLURM) does before the time limit: USR2 to every task
    tasks = psutil.Process(job._process.pid).children()
    assert len(tasks) == 2
    for task in tasks:
        task.send_signal(signal.SIGUSR2)
    assert job.results()[0]["world_size"] == 2
    log = "".join(p.read_text() for p in (tmp_path / "logs").glob("*_0_log.*"))
    assert "stopping at the next step or epoch boundary" in log and "Requeued job" in log, log[-3000:]
    assert "finetune: resuming from" in log and not state.exists()
    metrics = json.loads((root / "metrics/finetune.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3 * (180 // 16) and 0 <= metrics["top1"] <= 1
    clf, names, _ = load_classifier(root / "models/finetune/classifier.pth")
    assert len(names) == 10 and np.isfinite(sum(float(t.sum()) for t in clf.state_dict().values()))
