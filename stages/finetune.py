"""finetune: the MAE recipe on the pretrained encoder; best epoch by val top-1, reported on test.

With ``finetune.random_init`` the same architecture is also trained from a random initialisation with the same
recipe, data order and budget (``random_init_top1`` in metrics/finetune.json): what pretraining buys.

Distributed: under ``torchrun --nproc_per_node N -m stages.finetune`` or ``make stage-slurm STAGE=finetune``
the classifier is trained with DDP (``finetune.batch_size`` per rank; the lr follows the effective batch),
every rank evaluates its own share of val and test and the counts are summed; rank 0 alone writes.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from tqdm import tqdm

from ijepa.checkpoint import load_encoder
from ijepa.data import eval_loader, eval_transform, labelled_splits, pretrain_transform, read_manifest, shard_urls
from ijepa.data.memory import decode_split, epoch_batches, memory_eval_batches
from ijepa.data.transforms import Normalize
from ijepa.distributed import barrier, ddp
from ijepa.finetune import (
    Classifier,
    Preprocess,
    evaluate,
    fit_head,
    load_classifier,
    train_classifier,
    with_drop_path,
)
from ijepa.models.vit import random_like
from pipeline.distributed import distributed_stage
from pipeline.models import example_images
from pipeline.outputs import plot_series
from pipeline.params import section
from pipeline.resume import EpochState, file_key, shards_key
from pipeline.stage import main
from pipeline.stagerun import StageRun

SECTIONS = ("seed", "finetune", "tracking")
UNTRAINED = {"finetune": ("log_model", "stall_timeout_s")}  # keys a resumed run may change: they train nothing
SHARDS, OUT = Path("data/shards"), Path("models/finetune/classifier.pth")
MODELS = ("pretrained", "random_init")  # random_init: the same architecture and recipe from a random start
STATES = {"pretrained": "finetune", "random_init": "finetune-random_init"}  # under models/resume


@distributed_stage("finetune.device")
def run(params: dict, ctx, tracker, device) -> dict:
    p, seed = section(params, "finetune"), section(params, "seed")
    encoder = load_encoder(ctx.root / p.checkpoint, which=p.which)
    manifest = read_manifest(ctx.root / SHARDS)
    crop = encoder.img_size[0]
    pre = Preprocess(crop, p.resize_size or crop)
    train = manifest["splits"]["train"]
    steps = train["count"] // (p.batch_size * p.accum_steps * ctx.world_size)
    data = _data(ctx, p, manifest, pre, seed, steps, device)
    job = StageRun("finetune", ctx, tracker, device)
    # resumed after a kill or a preemption from the last finished epoch, under the same params, data and encoder
    inputs = {"train": shards_key(train), "checkpoint": file_key(ctx.root / p.checkpoint)}
    states = {n: job.state(params, ("seed", "finetune"), name=STATES[n], exclude=UNTRAINED, **inputs) for n in MODELS}
    metrics, rows, split = {}, {}, "test" if "test" in data.urls else "val"
    for name in MODELS if p.random_init else MODELS[:1]:
        model = _classifier(name, encoder, p, seed, ctx, len(manifest["classes"])).to(device)
        result = _train(name, model, p, states[name], data, job, device)
        if result is None:
            return job.stopped(states[name])
        barrier()  # rank 0 has written the best classifier
        best, _, _ = load_classifier(states[name].companion("best.pth"))
        test = evaluate(best.to(device), data.eval_batches(split), prepare=data.prepare, device=device)
        got = {k: test[k] for k in ("top1", "top5")} | {k: result[k] for k in ("val_top1", "best_epoch")}
        got |= {"best_weights": result["weights"]} | {k: v for k, v in result.items() if k.startswith("lp_")}
        metrics |= {k if name == "pretrained" else f"{name}_{k}": v for k, v in got.items()}
        metrics |= {"lr": result["lr"], "steps": result["steps"], "world_size": ctx.world_size}
        for r in result["history"]:
            rows.setdefault(r["epoch"], {"epoch": r["epoch"]}).update({f"{name}_{k}": v for k, v in r.items()})
    if "random_init_top1" in metrics:
        metrics["gap_vs_random_init"] = round(metrics["top1"] - metrics["random_init_top1"], 5)
    if not ctx.is_main:
        return metrics
    (ctx.root / OUT).parent.mkdir(parents=True, exist_ok=True)
    states["pretrained"].companion("best.pth").replace(ctx.root / OUT)
    for state in states.values():
        state.companion("best.pth").unlink(missing_ok=True)  # the random-init classifier: its metrics only
        state.finish()
    curves = [f"{n}_{k}" for n in MODELS if f"{n}_train_loss" in rows[1] for k in ("train_loss", "model_val_top1")]
    png = plot_series(list(rows.values()), "epoch", curves, ctx.root / "plots/finetune.png", "finetuning")

    def model():
        example = example_images(data.urls[split], pre.crop_size, pre.resize_size)
        return section(params, "tracking"), "classifier", load_classifier(ctx.root / OUT)[0], example

    return job.publish(metrics, plots=[png], model=model if p.log_model else None)


def _classifier(name: str, encoder, p, seed: int, ctx, num_classes: int) -> Classifier:
    """The classifier on the pretrained encoder, or (``random_init``) on the same architecture drawn from the
    seed; every rank draws its augmentation and drop path differently afterwards (DDP starts from rank 0's
    weights)."""
    if name == "random_init":
        encoder = random_like(encoder, seed)
    torch.manual_seed(seed + 1)  # the same head initialisation for both
    model = Classifier(with_drop_path(encoder, p.drop_path), num_classes)
    if ctx.world_size > 1:
        torch.manual_seed(seed + 1_000_003 * ctx.rank)
    return model


class Data(NamedTuple):
    """What both classifiers train and are evaluated on (``_data``)."""

    train_batches: Callable  # epoch -> this rank's augmented training micro-batches
    eval_batches: Callable  # split -> this rank's share of an evaluation split
    prepare: Callable  # uint8 images -> normalised on the device
    preprocess: Preprocess
    classes: list[str]
    steps: int
    urls: dict


def _train(name: str, model: Classifier, p, state: EpochState, data: Data, job: StageRun, device) -> dict | None:
    """One classifier through ``train_classifier``, its epochs logged to MLflow under ``<name>_`` keys; with
    ``finetune.lp_steps`` its head is first fitted on the frozen encoder (LP-FT; repeated exactly on a resume,
    whose saved state then replaces it)."""
    ctx, log, lp = job.ctx, job.tracker.log_metrics, {}
    evaluation = {"prepare": data.prepare, "device": device, "bf16": p.bf16}
    if p.lp_steps:
        fit = fit_head(model, data.eval_batches("train"), steps=p.lp_steps, lr=p.lp_lr, **evaluation)
        val = evaluate(model, data.eval_batches("val"), **evaluation)
        lp = {"lp_train_top1": fit["train_top1"], "lp_val_top1": val["top1"]}
        if ctx.is_main:
            print(f"finetune {name}: LP-FT head fitted in {p.lp_steps} steps, val top-1 {val['top1']:.4f}", flush=True)
        log({f"{name}_{k}": v for k, v in lp.items()}, step=0)
    bar = tqdm(total=data.steps * p.epochs, desc=f"finetune {name}", mininterval=5, disable=not ctx.is_main)
    try:
        result = train_classifier(
            ddp(model, device),
            p.spec(),
            steps_per_epoch=data.steps,
            train_batches=data.train_batches,
            eval_batches=data.eval_batches,
            prepare=data.prepare,
            device=device,
            best_path=state.companion("best.pth"),  # outside models/finetune, which DVC deletes before a rerun
            class_names=data.classes,
            preprocess=data.preprocess,
            world_size=ctx.world_size,
            is_main=ctx.is_main,
            on_epoch=lambda e, row: log({f"{name}_{k}": v for k, v in row.items() if k != "epoch"}, step=e),
            progress=lambda loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}", refresh=False)),
            state=state,
            should_stop=job.should_stop,
        )
    finally:
        bar.close()
    return None if result is None else result | lp


def _data(ctx, p, manifest: dict, pre: Preprocess, seed: int, steps: int, device) -> Data:
    """With ``in_memory`` every split is decoded once for all epochs and batches are built in this process."""
    train = manifest["splits"]["train"]
    train_tf = pretrain_transform(
        pre.crop_size, crop_scale=p.crop_scale, horizontal_flip=p.horizontal_flip, rand_augment=p.rand_augment
    )
    urls = {s: shard_urls(ctx.root / SHARDS, s) for s in labelled_splits(manifest)}
    decoded = {s: decode_split(u, setting="finetune.in_memory") for s, u in urls.items()} if p.in_memory else {}
    eval_tf = eval_transform(pre.crop_size, pre.resize_size)
    shard = {"rank": ctx.rank, "world_size": ctx.world_size}
    loader = {"num_workers": p.num_workers, "stall_timeout": p.stall_timeout_s} | shard
    counts = [s["count"] for s in train["shards"]]
    stream = {"batch_size": p.batch_size, "transform": train_tf, "seed": seed, "counts": counts}

    def train_batches(epoch):
        source, per_epoch = decoded.get("train", urls["train"]), steps * p.accum_steps
        return epoch_batches(source, collator=None, batches_per_epoch=per_epoch, epoch=epoch, **stream, **loader)

    def eval_batches(split):
        if decoded:
            return memory_eval_batches(decoded[split], batch_size=256, transform=eval_tf, **shard)
        name = f"finetune eval loader ({split})"
        return eval_loader(urls[split], batch_size=256, transform=eval_tf, name=name, **loader)

    normalize = Normalize(pre.mean, pre.std)
    prepare = lambda x: normalize(x, device)  # noqa: E731
    return Data(train_batches, eval_batches, prepare, pre, manifest["classes"], steps, urls)


if __name__ == "__main__":
    main("finetune", run, SECTIONS)
