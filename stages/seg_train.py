"""seg_train: a segmentation head on the pretrained encoder and, in the same run, on a random-init encoder.

Both use the same head, data order and schedule, so ``seg_eval`` can report how much pretraining gives.
Outputs: models/seg/{pretrained,random_init}.pth (self-contained: ``ijepa segment`` needs nothing else).

Distributed: under ``torchrun --nproc_per_node N -m stages.seg_train`` (or ``make stage-slurm
STAGE=seg_train``) both heads train with DDP, ``seg_train.batch_size`` per rank; rank 0 alone writes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ijepa.checkpoint import load_encoder
from ijepa.models.vit import VisionTransformer, random_like
from ijepa.seg.data import SegDataset, load_class_config
from ijepa.seg.model import SegmentationModel, SegPreprocess, load_segmenter, save_segmenter
from ijepa.seg.train import train_segmentation
from pipeline.distributed import distributed_stage
from pipeline.outputs import plot_series
from pipeline.params import ParamError, section
from pipeline.resume import file_key, folder_key
from pipeline.stage import main
from pipeline.stagerun import StageRun

SECTIONS = ("seed", "seg_data", "seg_train", "tracking")
OUT = Path("models/seg")
MODELS = ("pretrained", "random_init")


def build_models(p, encoder: VisionTransformer, num_classes: int, seed: int) -> dict[str, SegmentationModel]:
    """The same head on the given encoder and on a random-init encoder of the same architecture."""
    models = {}
    for name, enc in zip(MODELS, (encoder, random_like(encoder, seed)), strict=True):
        torch.manual_seed(seed + 1)  # identical head initialisation for both
        models[name] = SegmentationModel(
            enc,
            num_classes,
            head=p.head,
            layers=p.layers,
            freeze_encoder=p.freeze_encoder,
            decoder_width=p.decoder_width,
        )
    return models


@distributed_stage("seg_train.device")
def run(params: dict, ctx, tracker, device) -> dict:
    d, p, seed = section(params, "seg_data"), section(params, "seg_train"), section(params, "seed")
    encoder = load_encoder(ctx.root / p.checkpoint, which=p.which)
    if d.height % encoder.patch_size or d.width % encoder.patch_size:
        raise ParamError(
            f"seg_data.height/width: {d.height}x{d.width} must be multiples of the encoder's patch size "
            f"{encoder.patch_size}"
        )
    if p.layers > encoder.depth:
        raise ParamError(f"seg_train.layers: {p.layers} exceeds the encoder's {encoder.depth} blocks")
    classes, size = load_class_config(ctx.root / d.classes), (d.height, d.width)
    augment = {"scale": p.scale, "hflip": p.hflip, "seed": seed}
    train_ds = SegDataset(ctx.root / d.train_dir, classes, d.mask_format, size, train=True, **augment)
    pre, metrics, rows = SegPreprocess(d.height, d.width), {}, {}
    job = StageRun("seg_train", ctx, tracker, device)
    # each model resumed after a kill or a preemption from its last finished epoch (a finished one: from its end)
    inputs = {"checkpoint": file_key(ctx.root / p.checkpoint), "train": folder_key(ctx.root / d.train_dir)}
    sections, untrained = ("seed", "seg_data", "seg_train"), {"seg_train": ("log_model",)}
    states = {n: job.state(params, sections, name=f"seg_train-{n}", exclude=untrained, **inputs) for n in MODELS}
    for name, model in build_models(p, encoder, len(classes.names), seed).items():
        history = train_segmentation(
            model,
            train_ds,
            p.spec(),
            device,
            seed=seed,
            rank=ctx.rank,
            world_size=ctx.world_size,
            desc=f"seg_train {name}",
            on_step=lambda r, name=name: tracker.log_metrics({f"{name}_loss": r["loss"]}, step=r["step"]),
            state=states[name],
            should_stop=job.should_stop,
        )
        if history is None:
            return job.stopped(states[name])
        if ctx.is_main:
            info = {"encoder": name, "checkpoint": p.checkpoint, "which": p.which, "epochs": p.epochs}
            save_segmenter(ctx.root / OUT / f"{name}.pth", model.cpu(), classes, pre, **info)
        metrics[f"{name}_final_loss"] = round(history[-1]["loss"], 5)
        for r in history:
            rows.setdefault(r["epoch"], {"epoch": r["epoch"]})[f"{name}_loss"] = r["loss"]
    for state in states.values():
        state.finish()
    if not ctx.is_main:
        return metrics
    metrics["train_images"] = len(train_ds)
    title = f"segmentation head ({p.head}, {'frozen' if p.freeze_encoder else 'finetuned'} encoder)"
    curves = [f"{n}_loss" for n in MODELS]
    png = plot_series(list(rows.values()), "epoch", curves, ctx.root / "plots/seg_train.png", title)

    def model():
        val = SegDataset(ctx.root / d.val_dir, classes, d.mask_format, size, train=False)
        example = np.stack([val[i][0][..., ::-1] for i in range(min(2, len(val)))])
        return section(params, "tracking"), "segmenter", load_segmenter(ctx.root / OUT / "pretrained.pth")[0], example

    return job.publish(metrics, plots=[png], model=model if p.log_model else None)


if __name__ == "__main__":
    main("seg_train", run, SECTIONS)
