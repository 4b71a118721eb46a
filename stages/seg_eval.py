"""seg_eval: dataset-level mIoU, per-class IoU and pixel accuracy on val, pretrained vs random-init encoder.

Writes metrics/seg_eval.json (``miou``, ``pixel_acc``, ``random_init_miou``, ``per_class_iou``), the per-class
IoU chart and a grid of validation overlays (image, ground truth, both predictions).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ijepa.device import pick_device
from ijepa.seg.data import IGNORE, SegDataset
from ijepa.seg.infer import colorize, evaluate_segmentation, predict_ids
from ijepa.seg.model import load_segmenter
from pipeline.outputs import new_figure, save_figure
from pipeline.params import section
from pipeline.stage import main
from pipeline.stagerun import StageRun

SECTIONS = ("seg_data", "seg_eval", "tracking")
MODELS = Path("models/seg")


def _nan_to_none(values):
    return [None if isinstance(v, float) and math.isnan(v) else round(v, 5) for v in values]


def iou_chart(names, results: dict, path: Path) -> Path:
    fig, axes = new_figure(1, 1, (max(6.0, 0.7 * len(names)), 3.6))
    ax, x, width = axes[0][0], np.arange(len(names)), 0.8 / len(results)
    for i, (label, res) in enumerate(results.items()):
        ax.bar(x + i * width, [0 if v is None else v for v in _nan_to_none(res["iou"])], width, label=label)
    ax.set_xticks(x + width * (len(results) - 1) / 2, names, rotation=45, ha="right")
    ax.set_ylabel("IoU")
    ax.set_ylim(0, 1)
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    title = ", ".join(f"{k} mIoU {v['miou']:.3f}" for k, v in results.items())
    return save_figure(fig, path, title)


def overlay_grid(models: dict, ds: SegDataset, names, vis_colors, n: int, device, path: Path) -> Path:
    """Rows: validation images; columns: image, ground truth, one prediction per model; a colour key of the
    classes (and of ignore) under the panels."""
    idx = np.linspace(0, len(ds) - 1, num=min(n, len(ds))).round().astype(int)
    cols = 2 + len(models)
    fig, axes = new_figure(len(idx), cols, (2.4 * cols, 1.9 * len(idx)))
    gt_colors = [*vis_colors]
    for r, i in enumerate(idx):
        img, mask = ds[int(i)]
        panels = [img[..., ::-1], np.where(mask[..., None] == IGNORE, 255, colorize(mask, gt_colors))]
        batch = torch.from_numpy(img[None])
        for model in models.values():
            pred = predict_ids(model, batch, [mask.shape], device)[0].numpy().astype(np.uint8)
            panels.append(colorize(pred, vis_colors))
        for c, (panel, title) in enumerate(zip(panels, ["image", "ground truth", *models], strict=True)):
            ax = axes[r][c]
            ax.imshow(panel, interpolation="nearest")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=9)
    key = [*zip(names, vis_colors, strict=True), ("ignore (ground truth)", (255, 255, 255))]
    return save_figure(fig, path, "validation overlays", legend=key)


def run(params: dict, ctx, tracker) -> dict:
    d, p = section(params, "seg_data"), section(params, "seg_eval")
    device = pick_device(p.device)
    models, results = {}, {}
    for name in ("pretrained", "random_init"):
        model, classes, pre = load_segmenter(ctx.root / MODELS / f"{name}.pth")
        models[name] = model.to(device)
    ds = SegDataset(ctx.root / d.val_dir, classes, d.mask_format, (pre.height, pre.width), train=False)
    unknown = ds.scan_masks()
    loader = {"batch_size": p.batch_size, "num_workers": p.num_workers}
    for name, model in models.items():
        results[name], _ = evaluate_segmentation(
            model, ds, len(classes.names), device, desc=f"seg_eval {name}", **loader
        )
    pt, ri = results["pretrained"], results["random_init"]
    metrics = {
        "miou": round(pt["miou"], 5),
        "pixel_acc": round(pt["pixel_acc"], 5),
        "random_init_miou": round(ri["miou"], 5),
        "random_init_pixel_acc": round(ri["pixel_acc"], 5),
        "per_class_iou": dict(zip(classes.names, _nan_to_none(pt["iou"]), strict=True)),
        "random_init_per_class_iou": dict(zip(classes.names, _nan_to_none(ri["iou"]), strict=True)),
        "val_images": len(ds),
        "unknown_color_pixels": unknown["unknown_pixels"],
    }
    chart = iou_chart(list(classes.names), results, ctx.root / "plots/seg_iou.png")
    grid = overlay_grid(
        models, ds, classes.names, classes.vis_colors, p.overlays, device, ctx.root / "plots/seg_overlays.png"
    )
    StageRun("seg_eval", ctx, tracker, device).publish(metrics, plots=[chart, grid])
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


if __name__ == "__main__":
    main("seg_eval", run, SECTIONS)
