"""finetune: the MAE recipe on the pretrained encoder; best epoch by val top-1, reported on test.

Distributed: under ``torchrun --nproc_per_node N -m stages.finetune`` or ``make stage-slurm STAGE=finetune``
the classifier is trained with DDP (``finetune.batch_size`` per rank; the lr follows the effective batch),
every rank evaluates its own share of val and test and the counts are summed; rank 0 alone writes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm import tqdm

from ijepa.checkpoint import load_encoder
from ijepa.data import eval_loader, eval_transform, pretrain_transform, read_manifest, shard_urls
from ijepa.data.loaders import Normalize
from ijepa.data.memory import decode_split, epoch_batches, memory_eval_batches
from ijepa.distributed import any_rank, barrier, ddp
from ijepa.finetune import (
    Classifier,
    Preprocess,
    evaluate,
    load_classifier,
    train_classifier,
    with_drop_path,
)
from pipeline import preemption
from pipeline.distributed import distributed_stage
from pipeline.models import example_images, register_model
from pipeline.outputs import plot_series, write_json
from pipeline.params import section
from pipeline.resume import EpochState, file_key, run_key, shards_key
from pipeline.stage import main

SECTIONS = ("seed", "finetune", "tracking")
SHARDS, OUT = Path("data/shards"), Path("models/finetune/classifier.pth")


@distributed_stage("finetune.device")
def run(params: dict, ctx, tracker, device) -> dict:
    p, seed = section(params, "finetune"), section(params, "seed")
    encoder = with_drop_path(load_encoder(ctx.root / p.checkpoint, which=p.which), p.drop_path)
    manifest = read_manifest(ctx.root / SHARDS)
    model = Classifier(encoder, len(manifest["classes"])).to(device)
    if ctx.world_size > 1:  # DDP starts every rank from rank 0's weights; augmentation and drop path then
        torch.manual_seed(seed + 1_000_003 * ctx.rank)  # draw differently on each rank (rank 0 as one process)
    crop = encoder.img_size[0]
    pre = Preprocess(crop, p.resize_size or crop)
    train = manifest["splits"]["train"]
    steps = train["count"] // (p.batch_size * p.accum_steps * ctx.world_size)
    train_batches, eval_batches, normalize, urls = _data(ctx, p, manifest, pre, seed, steps)
    # resumed after a kill or a preemption from the last finished epoch, under the same params, data and encoder
    key = run_key(
        params, ("seed", "finetune"), exclude={"finetune": ("log_model", "stall_timeout_s")},
        world_size=ctx.world_size, train=shards_key(train), checkpoint=file_key(ctx.root / p.checkpoint),
    )  # fmt: skip
    state = EpochState(ctx.root, "finetune", key, is_main=ctx.is_main)
    best_path = state.companion("best.pth")  # outside models/finetune, which DVC deletes before a rerun
    bar = tqdm(total=steps * p.epochs, desc="finetune", mininterval=5, disable=not ctx.is_main)
    try:
        result = train_classifier(
            ddp(model, device),
            p.spec(),
            steps_per_epoch=steps,
            train_batches=train_batches,
            eval_batches=eval_batches,
            prepare=lambda x: normalize(x, device),
            device=device,
            best_path=best_path,
            class_names=manifest["classes"],
            preprocess=pre,
            world_size=ctx.world_size,
            is_main=ctx.is_main,
            on_epoch=lambda e, row: tracker.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=e),
            progress=lambda loss: (bar.update(1), bar.set_postfix(loss=f"{loss:.3f}", refresh=False)),
            state=state,
            should_stop=lambda: any_rank(preemption.requested(), device),
        )
    finally:
        bar.close()
    if result is None:
        print(f"finetune: stopped; {state.path} resumes from the last finished epoch", flush=True)
        return {"stopped": True}
    barrier()  # rank 0 has written the best classifier
    best, _, _ = load_classifier(best_path)
    split = "test" if "test" in urls else "val"
    test = evaluate(best.to(device), eval_batches(split), prepare=lambda x: normalize(x, device), device=device)
    if not ctx.is_main:
        return {"top1": test["top1"]}
    metrics = {
        "top1": test["top1"],
        "top5": test["top5"],
        "val_top1": result["val_top1"],
        "best_epoch": result["best_epoch"],
        "best_weights": result["weights"],
        "lr": result["lr"],
        "steps": result["steps"],
        "world_size": ctx.world_size,
    }
    (ctx.root / OUT).parent.mkdir(parents=True, exist_ok=True)
    best_path.replace(ctx.root / OUT)
    state.finish()
    write_json(ctx.root / "metrics/finetune.json", metrics)
    png = plot_series(
        result["history"], "epoch", ["train_loss", "model_val_top1"], ctx.root / "plots/finetune.png", "finetuning"
    )
    tracker.log_artifact(png, "plots")
    if p.log_model:
        example = example_images(urls[split], pre.crop_size, pre.resize_size)
        register_model(tracker, ctx, section(params, "tracking"), "classifier", best, example)
    return metrics


def _data(ctx, p, manifest: dict, pre: Preprocess, seed: int, steps: int):
    """(train_batches, eval_batches, normalize, urls): this rank's augmented training micro-batches of an epoch
    and its share of an evaluation split; with ``in_memory`` every split is decoded once for all epochs and
    batches are built in this process."""
    train = manifest["splits"]["train"]
    train_tf = pretrain_transform(
        pre.crop_size, crop_scale=p.crop_scale, horizontal_flip=p.horizontal_flip, rand_augment=p.rand_augment
    )
    urls = {s: shard_urls(ctx.root / SHARDS, s) for s in manifest["splits"]}
    decoded = {s: decode_split(u, setting="finetune.in_memory") for s, u in urls.items()} if p.in_memory else {}
    eval_tf = eval_transform(pre.crop_size, pre.resize_size)
    shard = dict(rank=ctx.rank, world_size=ctx.world_size)

    def train_batches(epoch):
        return epoch_batches(
            decoded.get("train", urls["train"]), collator=None, batches_per_epoch=steps * p.accum_steps,
            epoch=epoch, num_workers=p.num_workers, stall_timeout=p.stall_timeout_s, batch_size=p.batch_size,
            transform=train_tf, seed=seed, counts=[s["count"] for s in train["shards"]], **shard,
        )  # fmt: skip

    def eval_batches(split):
        if decoded:
            return memory_eval_batches(decoded[split], batch_size=256, transform=eval_tf, **shard)
        return eval_loader(
            urls[split], batch_size=256, transform=eval_tf, num_workers=p.num_workers, stall_timeout=p.stall_timeout_s,
            name=f"finetune eval loader ({split})", **shard,
        )  # fmt: skip

    return train_batches, eval_batches, Normalize(pre.mean, pre.std), urls


if __name__ == "__main__":
    main("finetune", run, SECTIONS)
