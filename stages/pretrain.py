"""pretrain: I-JEPA on data/shards/train -> models/pretrain/jepa-latest.pth.tar, loss/lr/EMA curves.

An interrupted run resumes from the latest checkpoint on the next ``dvc repro`` (the output is persistent);
a checkpoint written under different params, a different world size or other training shards is set aside
(moved to ``models/pretrain.stale-<time>``), never resumed.

Distributed: run under ``torchrun --nproc_per_node N -m stages.pretrain`` or ``make pretrain-slurm``
(submitit); each rank reads its own shards, DDP averages gradients, the logged loss is all-reduced and
only rank 0 writes. ``pretrain.batch_size`` is per rank: the effective batch is batch_size x world size.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ijepa.checkpoint import load_checkpoint_meta, load_encoder
from ijepa.data import eval_transform, pretrain_transform, read_manifest, shard_urls
from ijepa.data.loaders import Normalize, build_batch
from ijepa.data.memory import DecodedSplit, decode_split, epoch_batches
from ijepa.distributed import all_reduce_mean, any_rank, wrap_ddp
from ijepa.monitor import CollapseError, HealthMonitor
from ijepa.pretrain import ModelSpec, OptimSpec, pretrain
from pipeline import preemption
from pipeline.context import params_hash
from pipeline.distributed import distributed_stage
from pipeline.models import example_images, register_model
from pipeline.outputs import StepCSV, plot_series, text_figure, write_json
from pipeline.params import ParamError, check_mask_geometry, mask_collator, section
from pipeline.stage import main

SECTIONS = ("seed", "data", "model", "mask", "optim", "pretrain", "objective", "tracking")
SHARDS, OUT = Path("data/shards"), Path("models/pretrain")
STEPS_CSV = Path("metrics/pretrain_steps.csv")  # persistent in dvc.yaml, like the checkpoint it goes with
COLUMNS = ["step", "epoch", "loss", "lr", "wd", "momentum", "k_enc", "k_pred"]
MONITOR_CSV = Path("metrics/pretrain_monitor.csv")  # persistent too: a resumed run keeps the rows before it
MONITOR_COLUMNS = ["step", "epoch", "rankme", "feature_spread", "knn_top1"]


def _health_monitor(root: Path, manifest: dict, mon, crop: int, device, bf16: bool) -> HealthMonitor:
    """The first ``mon.bank`` training images and ``mon.queries`` validation images, centre-cropped once
    (the train split continues after the bank when there is no validation split)."""
    transform, urls = eval_transform(crop), lambda split: shard_urls(root / SHARDS, split)
    has_val = "val" in manifest["splits"]
    train = decode_split(urls("train"), setting="pretrain.monitor", limit=mon.bank + (0 if has_val else mon.queries))
    n = min(mon.bank, len(train))
    bank = DecodedSplit(train.images[:n], train.labels[:n], train.keys[:n])
    if has_val:
        queries = decode_split(urls("val"), setting="pretrain.monitor", limit=mon.queries)
    else:
        queries = DecodedSplit(train.images[n:], train.labels[n:], train.keys[n:])
        if not len(queries):
            raise ParamError(
                f"pretrain.monitor.bank: {mon.bank} takes every training image and there is no validation split "
                "left for the queries; lower it"
            )
    return HealthMonitor(
        build_batch(bank.images, transform),
        bank.labels,
        build_batch(queries.images, transform),
        queries.labels,
        num_classes=len(manifest["classes"]),
        prepare=Normalize(),
        device=device,
        bf16=bf16,
        k=mon.k,
    )


def _resume_step(out: Path, phash: str) -> int:
    latest = out / "jepa-latest.pth.tar"
    if not latest.exists():
        return 0
    meta = load_checkpoint_meta(latest)
    if meta.get("params", {}).get("params_hash") == phash:
        return int(meta["step"])
    stale = out.with_name(out.name + f".stale-{int(time.time())}")
    shutil.move(out, stale)  # other params or data: keep it for inspection, never resume from it
    print(f"pretrain: {latest} was trained with other params or training data; moved to {stale}, starting fresh")
    return 0


def _check_history(rows: list[dict], start: int, path: Path, out: Path) -> None:
    """A resumed run needs the loss rows of the steps before its checkpoint: its metrics and plot use them."""
    if [int(r["step"]) for r in rows] != list(range(start)):  # FileNotFoundError: the stage CLI prints one line
        raise FileNotFoundError(
            f"{path} holds {len(rows)} step rows but {out / 'jepa-latest.pth.tar'} resumes at step {start}: the "
            f"loss history of the run being resumed is missing or incomplete; restore {path}, or delete {out} "
            "to train from scratch"
        )


@distributed_stage("pretrain.device")
def run(params: dict, ctx, tracker, device) -> dict:
    data, model, mask = section(params, "data"), section(params, "model"), section(params, "mask")
    optim, pre, seed = section(params, "optim"), section(params, "pretrain"), section(params, "seed")
    objective = section(params, "objective")
    check_mask_geometry(mask, data)
    manifest = read_manifest(ctx.root / SHARDS)
    train_split = manifest["splits"]["train"]
    n_train = train_split["count"]
    ipe = n_train // (pre.batch_size * ctx.world_size)
    if ipe < 1:
        raise ParamError(
            f"pretrain.batch_size: {pre.batch_size} x {ctx.world_size} ranks exceeds the {n_train} "
            "training images: not one full batch per epoch"
        )
    urls = shard_urls(ctx.root / SHARDS, "train")
    # What a checkpoint continues: its params, the world size (effective batch, each rank's data) and the
    # training shards themselves (new data from another `prepare` must start afresh, never "resume" a run
    # that already finished on other images).
    train_shards = params_hash([s["sha256"] for s in train_split["shards"]])
    # The health monitor's settings change no weight: a run continues under others.
    trained = {s: params[s] for s in SECTIONS if s != "tracking"}
    trained["pretrain"] = {k: v for k, v in params["pretrain"].items() if k != "monitor"}
    phash = params_hash({**trained, "world_size": ctx.world_size, "train": train_shards})
    out = ctx.root / OUT
    start = _resume_step(out, phash) if ctx.is_main else 0
    steps_path = ctx.root / STEPS_CSV
    # rank 0 alone touches the step log (others would truncate it under its feet)
    steps_csv = StepCSV(steps_path, COLUMNS, truncate_from=start) if ctx.is_main else None
    if steps_csv is not None and start:
        _check_history(steps_csv.read(), start, steps_path, out)
    # a resumed run was monitored up to and including its checkpoint's step
    monitor_csv = (
        StepCSV(ctx.root / MONITOR_CSV, MONITOR_COLUMNS, truncate_from=start + 1 if start else 0)
        if ctx.is_main
        else None
    )
    if ctx.world_size > 1:  # rank 0 decided (and set aside a stale checkpoint); the others follow
        flag = [start]
        torch.distributed.broadcast_object_list(flag, src=0)
        start = flag[0]
    collator = mask_collator(mask, data, seed=seed, rank=ctx.rank)
    transform = pretrain_transform(
        data.crop_size,
        crop_scale=data.crop_scale,
        horizontal_flip=data.horizontal_flip,
        color_distortion=data.color_distortion,
        color_jitter=data.color_jitter,
        gaussian_blur=data.gaussian_blur,
    )
    normalize = Normalize()

    split = decode_split(urls, setting="data.in_memory") if data.in_memory else None  # decoded once for every epoch

    def make_batches(epoch: int, start_step: int):
        # the epoch's stream is fixed by (seed, epoch, rank) and masks by the step: a run resumed inside an
        # epoch (after a preemption) rebuilds the epoch and skips the batches it already trained on
        loader = epoch_batches(
            split if split is not None else urls, collator=collator, batches_per_epoch=ipe, epoch=epoch,
            start=start_step - epoch * ipe, batch_size=pre.batch_size, transform=transform, seed=seed,
            rank=ctx.rank, world_size=ctx.world_size, num_workers=data.num_workers,
            stall_timeout=data.stall_timeout_s, shuffle_buffer=data.shuffle_buffer,
            counts=[s["count"] for s in train_split["shards"]],
        )  # fmt: skip
        for (imgs, _), masks_enc, masks_pred in loader:
            yield normalize(imgs, device), masks_enc, masks_pred

    bar = tqdm(total=ipe * pre.epochs, initial=start, desc="pretrain", disable=not ctx.is_main, mininterval=5)

    def on_step(log) -> None:
        row = {k: getattr(log, k) for k in COLUMNS}
        if steps_csv is not None:
            steps_csv.write(row)
            tracker.log_metrics({k: row[k] for k in COLUMNS[2:]}, step=log.step)
        bar.update(1)
        bar.set_postfix(loss=f"{log.loss:.4f}", epoch=log.epoch, refresh=False)

    mon = pre.monitor
    health = _health_monitor(ctx.root, manifest, mon, data.crop_size, device, optim.bf16) if mon.enabled else None
    monitor_seconds = 0.0

    def monitor(encoder, step: int) -> None:
        nonlocal monitor_seconds
        t = time.perf_counter()
        values = health(encoder)
        monitor_seconds += time.perf_counter() - t
        if monitor_csv is not None:
            monitor_csv.write({"step": step, "epoch": round(step / ipe, 4), **values})
            tracker.log_metrics({f"monitor_{k}": v for k, v in values.items()}, step=step)
        # an encoder starts with a low rank (random init: about 3 on the demo): the floor applies after a grace
        if step and step >= mon.grace_epochs * ipe and mon.min_rank and values["rankme"] < mon.min_rank:
            msg = (
                f"RankMe {values['rankme']:.2f} at step {step} (epoch {step / ipe:.2f}) is below "
                f"pretrain.monitor.min_rank={mon.min_rank:g}: the target encoder's features are collapsing"
            )
            if mon.stop_on_collapse:  # same values on every rank: all of them stop here
                raise CollapseError(f"{msg}; stopped (pretrain.monitor.stop_on_collapse)")
            if ctx.is_main:
                tqdm.write(f"pretrain: warning: {msg}", file=sys.stderr)

    t0 = time.perf_counter()
    try:
        result = pretrain(
            model=ModelSpec(
                name=model.name,
                patch_size=data.patch_size,
                img_size=data.crop_size,
                in_chans=3,
                pred_depth=model.pred_depth,
                pred_emb_dim=model.pred_emb_dim,
                overrides=model.overrides(),
                objective=objective.spec(),
            ),
            optim=OptimSpec(
                epochs=pre.epochs,
                warmup=optim.warmup,
                start_lr=optim.start_lr,
                lr=optim.lr,
                final_lr=optim.final_lr,
                weight_decay=optim.weight_decay,
                final_weight_decay=optim.final_weight_decay,
                ema=optim.ema,
                ipe_scale=optim.ipe_scale,
                bf16=optim.bf16,
            ),
            ipe=ipe,
            batch_size=pre.batch_size,
            make_batches=make_batches,
            out_dir=out,
            device=device,
            seed=seed,
            save_every_epochs=pre.save_every_epochs,
            world_size=ctx.world_size,
            is_main=ctx.is_main,
            wrap=(lambda jepa: wrap_ddp(jepa, device)) if ctx.world_size > 1 else None,
            reduce_loss=all_reduce_mean if ctx.world_size > 1 else None,
            on_step=on_step,
            on_epoch=lambda e, loss: tracker.log_metrics({"epoch_loss": loss}, step=e),
            should_stop=lambda: any_rank(preemption.requested(), device),
            monitor=monitor if health is not None else None,
            monitor_every=mon.every,
            params={"params_hash": phash, "sections": {s: params[s] for s in SECTIONS if s != "tracking"}},
        )
    finally:  # a stopped run's error starts on a line of its own
        bar.close()
    seconds = time.perf_counter() - t0
    if result["stopped"]:
        print(f"pretrain: stopped at step {result['step']}; {result['checkpoint']} resumes from there", flush=True)
        return {"stopped": True, "steps": result["step"]}
    if not ctx.is_main:
        return {"steps": result["step"], "world_size": ctx.world_size}
    rows = steps_csv.read()
    first = [r["loss"] for r in rows if r["epoch"] == 0]
    last = [r["loss"] for r in rows if r["epoch"] == pre.epochs - 1]
    metrics = {
        "final_loss": round(sum(last) / max(len(last), 1), 5),
        "first_epoch_loss": round(sum(first) / max(len(first), 1), 5),
        "steps": result["step"],
        "epochs": result["epoch"],
        # None when this invocation trained no step (a finished run re-entered after a code change)
        "images_per_second": (
            round((result["step"] - start) * pre.batch_size * ctx.world_size / seconds, 1)
            if result["step"] > start
            else None
        ),
        "ipe": ipe,
        "world_size": ctx.world_size,
        "effective_batch_size": pre.batch_size * ctx.world_size,
        "monitor_seconds": round(monitor_seconds, 2),  # spent in the health monitor by this invocation
    }
    health_rows = monitor_csv.read()
    if health_rows:
        metrics |= {f"final_{k}": health_rows[-1][k] for k in MONITOR_COLUMNS[2:]}
        metrics |= {"min_rankme": min(r["rankme"] for r in health_rows)}
    write_json(ctx.root / "metrics/pretrain.json", metrics)
    png = plot_series(
        rows,
        "step",
        ["loss", "lr", "momentum"],
        ctx.root / "plots/pretrain_curves.png",
        f"I-JEPA pretraining ({model.name}, {data.crop_size}/{data.patch_size})",
    )
    tracker.log_artifact(png, "plots")
    tracker.log_artifact(steps_path, "metrics")
    png = _plot_health(health_rows, health, ctx.root / "plots/pretrain_monitor.png")
    tracker.log_artifact(png, "plots")
    tracker.log_artifact(ctx.root / MONITOR_CSV, "metrics")
    tracker.log_dict(load_checkpoint_meta(result["checkpoint"]), "checkpoint/meta.json")
    if pre.log_model:  # the target encoder, what every downstream stage evaluates
        split = "val" if "val" in manifest["splits"] else "train"
        example = example_images(shard_urls(ctx.root / SHARDS, split), data.crop_size)
        encoder = load_encoder(result["checkpoint"], which="target_encoder")
        register_model(tracker, ctx, section(params, "tracking"), "encoder", encoder, example)
    return metrics


def _plot_health(rows: list[dict], health: HealthMonitor | None, path: Path) -> Path:
    if rows:
        title = f"target-encoder health ({len(health.bank)} bank, {len(health.queries)} query images)"
        return plot_series(rows, "step", MONITOR_COLUMNS[2:], path, title)
    return text_figure(path, "no health monitor rows (pretrain.monitor.enabled: false)")


if __name__ == "__main__":
    main("pretrain", run, SECTIONS)
