"""pretrain: I-JEPA on the shards' train split (and any other ``pretrain.splits`` names) ->
models/pretrain/jepa-latest.pth.tar, loss/lr/EMA curves.

The run in progress lives in ``models/resume/pretrain`` (checkpoint, step and health logs, training time) and
becomes ``models/pretrain`` when it finishes. An interrupted run resumes from there on the next run of the stage;
a finished run re-entered after a code change trains no step; a run written under different params, a
different world size or other training shards is set aside (``models/resume/pretrain.stale-<time>``), never
resumed.

Distributed: run under ``torchrun --nproc_per_node N -m stages.pretrain`` or as a job (``launcher.kind``);
each rank reads its own shards, DDP averages gradients, the logged loss is all-reduced and only rank 0 writes.
``pretrain.batch_size`` is per rank: the effective batch is batch_size x world size.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ijepa.checkpoint import load_checkpoint_meta, load_encoder
from ijepa.data import pretrain_transform, read_manifest, shard_urls
from ijepa.data.memory import decode_split, epoch_batches
from ijepa.data.transforms import Normalize
from ijepa.distributed import all_reduce_mean, wrap_ddp
from ijepa.pretrain import pretrain
from pipeline.distributed import distributed_stage
from pipeline.models import example_images
from pipeline.monitoring import COLUMNS as MONITOR_COLUMNS
from pipeline.monitoring import MonitorHook, build_health_monitor, health_metrics, plot_health
from pipeline.outputs import StepCSV, plot_series, read_rows, write_json
from pipeline.params import ParamError, check_mask_geometry, mask_collator, section
from pipeline.resume import RESUME_DIR, check_history, checkpoint_step, shards_key
from pipeline.stage import main
from pipeline.stagerun import StageRun

SECTIONS = ("seed", "data", "model", "mask", "optim", "pretrain", "objective", "tracking")
TRAINED = SECTIONS[:-1]  # what a checkpoint was trained under (tracking changes no weight)
SHARDS, OUT, LATEST = Path("data/shards"), Path("models/pretrain"), "jepa-latest.pth.tar"
WORK = RESUME_DIR / "pretrain"  # the run in progress; OUT, the DVC output, holds finished runs only
COLUMNS = ["step", "epoch", "loss", "lr", "wd", "momentum", "k_enc", "k_pred"]
# beside the checkpoint: the history of the run it holds (step rows, health rows, training time over its
# invocations), which a resumed run continues; metrics/ gets copies of the two logs when the run is finished
STEPS, MONITOR, TIMING = "steps.csv", "monitor.csv", "timing.json"
STEPS_CSV, MONITOR_CSV = Path("metrics/pretrain_steps.csv"), Path("metrics/pretrain_monitor.csv")


@distributed_stage("pretrain.device")
def run(params: dict, ctx, tracker, device) -> dict:
    data, model, mask = section(params, "data"), section(params, "model"), section(params, "mask")
    optim, pre, seed = section(params, "optim"), section(params, "pretrain"), section(params, "seed")
    check_mask_geometry(mask, data)
    if ctx.is_main and (note := batch_note(params, ctx.world_size)):
        print(note, flush=True)
    manifest = read_manifest(ctx.root / SHARDS)
    train_split = _training_split(ctx.root / SHARDS, manifest, pre.splits)
    ipe = _steps_per_epoch(train_split["count"], pre.batch_size, ctx.world_size)
    job = StageRun("pretrain", ctx, tracker, device)
    # what a checkpoint continues (pipeline.resume): the params but the monitor's and the tracking's (they change
    # no weight), the world size (effective batch, each rank's data) and the training shards themselves
    key = job.key(params, TRAINED, exclude={"pretrain": ("monitor",)}, train=shards_key(train_split))
    work = ctx.root / WORK
    start = _enter(ctx.root, key) if ctx.is_main else 0
    # rank 0 alone touches the logs (others would truncate them under its feet)
    steps_csv, monitor_csv = _history(ctx.root, work, start) if ctx.is_main else (None, None)
    if ctx.world_size > 1:  # rank 0 decided (and set aside a stale checkpoint); the others follow
        flag = [start]
        torch.distributed.broadcast_object_list(flag, src=0)
        start = flag[0]
    bar = tqdm(total=ipe * pre.epochs, initial=start, desc="pretrain", disable=not ctx.is_main, mininterval=5)

    def on_step(log) -> None:
        if steps_csv is not None:
            steps_csv.write({k: getattr(log, k) for k in COLUMNS})
            tracker.log_metrics({k: getattr(log, k) for k in COLUMNS[2:]}, step=log.step)
        bar.update(1)
        bar.set_postfix(loss=f"{log.loss:.4f}", epoch=log.epoch, refresh=False)

    health = (
        build_health_monitor(ctx.root / SHARDS, manifest, pre.monitor, data.crop_size, device, optim.bf16)
        if pre.monitor.enabled
        else None
    )
    hook = MonitorHook(health, pre.monitor, ipe, monitor_csv, tracker) if health else None
    ddp = {"wrap": lambda jepa: wrap_ddp(jepa, device), "reduce_loss": all_reduce_mean} if ctx.world_size > 1 else {}
    t0 = time.perf_counter()
    try:
        result = pretrain(
            model=model.spec(data, section(params, "objective")),
            optim=optim.spec(pre.epochs, pre.batch_size * ctx.world_size),
            ipe=ipe,
            batch_size=pre.batch_size,
            make_batches=_batches(ctx, data, mask, pre, seed, train_split, ipe, device),
            out_dir=work,
            device=device,
            seed=seed,
            save_every_epochs=pre.save_every_epochs,
            world_size=ctx.world_size,
            is_main=ctx.is_main,
            on_step=on_step,
            on_epoch=lambda e, loss: tracker.log_metrics({"epoch_loss": loss}, step=e),
            should_stop=job.should_stop,
            monitor=hook,
            monitor_every=pre.monitor.every,
            params={"params_hash": key, "sections": {s: params[s] for s in TRAINED}},
            **ddp,
        )
    finally:  # a stopped run's error starts on a line of its own
        bar.close()
    seconds = time.perf_counter() - t0
    if ctx.is_main:  # rank 0 records the time (every rank trains the same steps)
        timing = _run_timing(work / TIMING, key, start, result["step"] - start, seconds, hook.seconds if hook else 0)
    if result["stopped"]:
        return job.stopped(f"{result['checkpoint']} resumes from step {result['step']}", steps=result["step"])
    if not ctx.is_main:
        return {"steps": result["step"], "world_size": ctx.world_size}
    # the run's own pace, from every invocation that trained steps: a finished run re-entered (DVC reruns the
    # stage after any change to ijepa/) trains nothing and reports the run's numbers, not null
    steps = timing["steps"]
    speed = round(steps * pre.batch_size * ctx.world_size / timing["seconds"], 1) if steps else None
    rows, health_rows = steps_csv.read(), monitor_csv.read()
    result["checkpoint"] = _publish(ctx.root)
    return _outputs(job, params, result, rows, health_rows, health, timing, speed, ipe)


def _enter(root: Path, key: str) -> int:
    """The step the run under ``key`` continues from, in its working folder ``WORK``: the run in progress there,
    else the finished run published in ``OUT`` (a code change reruns the stage: it trains no step), else 0.

    The run works outside ``OUT`` because a `dvc exp run` checks the workspace's outputs out of the DVC cache
    before it runs the stage, which would replace the files of a job it re-attaches to."""
    work, out = root / WORK, root / OUT
    start = checkpoint_step(work, LATEST, key, "pretrain")  # another key's run in progress is set aside
    if start or not (out / LATEST).exists():
        return start
    work.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():  # checkpoints are replaced by rename, never rewritten: a hard link is a copy
        if f.name.endswith(".pth.tar"):
            _link_or_copy(f, work / f.name)
        elif f.is_file():
            shutil.copy2(f, work / f.name)
    return checkpoint_step(work, LATEST, key, "pretrain")


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not allowed
        shutil.copy2(src, dst)


def _publish(root: Path) -> Path:
    """The finished run's folder becomes ``OUT`` (the previous one goes); its checkpoint's path."""
    work, out = root / WORK, root / OUT
    if out.exists():
        old = out.with_name(f"{out.name}.replaced")
        if old.exists():  # left by a kill between the renames below
            shutil.rmtree(old)
        out.rename(old)  # a kill from here on leaves WORK, which the next run publishes
        work.rename(out)
        shutil.rmtree(old)
    else:
        work.rename(out)
    return out / LATEST


def _history(root: Path, work: Path, start: int) -> tuple[StepCSV, StepCSV]:
    """The step and health logs of the run in ``work``, cut after ``start`` (a resumed run was monitored up to and
    including its checkpoint's step). They stay beside the checkpoint, not in metrics/ (files git tracks, which
    `dvc exp run` stashes and restores). A run whose folder lacks them (a checkpoint of earlier versions of this
    stage) continues the published logs."""
    for name, published in ((STEPS, STEPS_CSV), (MONITOR, MONITOR_CSV)):
        if start and not (work / name).exists() and (root / published).exists():
            shutil.copyfile(root / published, work / name)
    if start:  # checked before the logs are cut, so that a refused run keeps them as they were
        kept = [r for r in read_rows(work / STEPS) if r["step"] < start]
        check_history(kept, start, work / STEPS, work / LATEST)
    steps = StepCSV(work / STEPS, COLUMNS, truncate_from=start)
    return steps, StepCSV(work / MONITOR, MONITOR_COLUMNS, truncate_from=start + 1 if start else 0)


def _steps_per_epoch(images: int, batch_size: int, world_size: int) -> int:
    """Full effective batches per epoch (the last partial one is dropped), at least one."""
    ipe = images // (batch_size * world_size)
    if ipe < 1:
        raise ParamError(
            f"pretrain.batch_size: {batch_size} x {world_size} ranks exceeds the {images} training images: not one "
            "full batch per epoch"
        )
    return ipe


def batch_note(params: dict, world_size: int) -> str | None:
    """The run's first line when its effective batch is not the one its lrs were written for (``optim``)."""
    note = section(params, "optim").batch_note(section(params, "pretrain").batch_size, world_size)
    return note and f"pretrain: {note}"


def _run_timing(path: Path, key: str, start: int, trained: int, seconds: float, monitor_seconds: float) -> dict:
    """{"key", "steps", "seconds", "monitor_seconds"} of the checkpoint's run: this invocation's ``trained`` steps,
    ``seconds`` and monitor time added to those of the invocations before it (a run resumed at ``start`` > 0 whose
    record at ``path`` has its ``key``), written back when this invocation trained a step."""
    try:
        past = json.loads(path.read_text()) if start and path.exists() else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not the JSON pretraining writes ({e}); delete it to count the run afresh") from e
    if not isinstance(past, dict):
        raise ValueError(f"{path}: not the JSON pretraining writes (a {type(past).__name__}, not an object); delete it")
    past = past if past.get("key") == key else {}
    total = {
        "key": key,
        "steps": past.get("steps", 0) + trained,
        "seconds": round(past.get("seconds", 0.0) + (seconds if trained else 0.0), 3),
        "monitor_seconds": round(past.get("monitor_seconds", 0.0) + (monitor_seconds if trained else 0.0), 3),
    }
    if trained:
        write_json(path, total)
    return total


def _training_split(shard_dir: Path, manifest: dict, splits: tuple[str, ...]) -> dict:
    """The splits ``pretrain.splits`` names as one: {"count", "shards", "urls"} (e.g. train and the unlabeled
    images that prepare.unlabeled_per_class adds)."""
    missing = [s for s in splits if s not in manifest["splits"]]
    if missing:
        raise ParamError(
            f"pretrain.splits: {missing} not in {shard_dir} (it has {sorted(manifest['splits'])}); the unlabeled "
            "split comes from prepare.unlabeled_per_class"
        )
    infos = [manifest["splits"][s] for s in splits]
    return {
        "count": sum(i["count"] for i in infos),
        "shards": [shard for i in infos for shard in i["shards"]],
        "urls": [u for s in splits for u in shard_urls(shard_dir, s)],
    }


def _batches(ctx, data, mask, pre, seed: int, train_split: dict, ipe: int, device):
    """``make_batches`` of ``ijepa.pretrain.pretrain``: normalised images and masks of one epoch from a step on.

    The epoch's stream is fixed by (seed, epoch, rank) and masks by the step: a run resumed inside an epoch
    (after a preemption) rebuilds the epoch and skips the batches it already trained on."""
    urls = train_split["urls"]
    collator = mask_collator(mask, data, seed=seed, rank=ctx.rank)
    augment = ("crop_scale", "horizontal_flip", "color_distortion", "color_jitter", "gaussian_blur")
    transform = pretrain_transform(data.crop_size, **{k: getattr(data, k) for k in augment})
    normalize = Normalize()
    source = decode_split(urls, setting="data.in_memory") if data.in_memory else urls  # decoded once for every epoch
    stream = {"collator": collator, "batches_per_epoch": ipe, "batch_size": pre.batch_size, "transform": transform}
    stream |= {"seed": seed, "rank": ctx.rank, "world_size": ctx.world_size, "num_workers": data.num_workers}
    stream |= {"stall_timeout": data.stall_timeout_s, "shuffle_buffer": data.shuffle_buffer}
    stream |= {"counts": [s["count"] for s in train_split["shards"]]}

    def make_batches(epoch: int, start_step: int):
        loader = epoch_batches(source, epoch=epoch, start=start_step - epoch * ipe, **stream)
        for (imgs, _), masks_enc, masks_pred in loader:
            yield normalize(imgs, device), masks_enc, masks_pred

    return make_batches


def _outputs(job: StageRun, params, result, rows, health_rows, health, timing, speed, ipe) -> dict:
    """Rank 0's metrics, plots, MLflow artifacts and the registered target encoder of a finished run."""
    ctx = job.ctx
    data, model, pre = section(params, "data"), section(params, "model"), section(params, "pretrain")
    optim = section(params, "optim")
    first = [r["loss"] for r in rows if r["epoch"] == 0]
    last = [r["loss"] for r in rows if r["epoch"] == pre.epochs - 1]
    metrics = {
        "final_loss": round(sum(last) / max(len(last), 1), 5),
        "first_epoch_loss": round(sum(first) / max(len(first), 1), 5),
        "steps": result["step"],
        "epochs": result["epoch"],
        "images_per_second": speed,
        "ipe": ipe,
        "world_size": ctx.world_size,
        "effective_batch_size": pre.batch_size * ctx.world_size,
        "ref_batch_size": optim.ref_batch_size,  # the lrs in params belong to this batch; lr_scale adapts them
        "lr_scale": round(optim.lr_scale(pre.batch_size * ctx.world_size), 6),
        "monitor_seconds": round(timing["monitor_seconds"], 2),  # in the health monitor, over the run (as the speed)
    } | health_metrics(health_rows)
    title = f"I-JEPA pretraining ({model.name}, {data.crop_size}/{data.patch_size})"
    curves = plot_series(rows, "step", ["loss", "lr", "momentum"], ctx.root / "plots/pretrain_curves.png", title)
    monitor = plot_health(health_rows, health, ctx.root / "plots/pretrain_monitor.png")
    for name, published in ((STEPS, STEPS_CSV), (MONITOR, MONITOR_CSV)):
        shutil.copyfile(ctx.root / OUT / name, ctx.root / published)
    job.tracker.log_dict(load_checkpoint_meta(result["checkpoint"]), "checkpoint/meta.json")

    def encoder():  # the target encoder, what every downstream stage evaluates
        split = "val" if "val" in read_manifest(ctx.root / SHARDS)["splits"] else "train"
        example = example_images(shard_urls(ctx.root / SHARDS, split), data.crop_size)
        weights = load_encoder(result["checkpoint"], which="target_encoder")
        return section(params, "tracking"), "encoder", weights, example

    files = [ctx.root / STEPS_CSV, ctx.root / MONITOR_CSV]
    return job.publish(metrics, plots=[curves, monitor], files=files, model=encoder if pre.log_model else None)


if __name__ == "__main__":
    main("pretrain", run, SECTIONS, describe=batch_note)
