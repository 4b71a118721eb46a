"""seg_prepare: demo segmentation scenes -> data/seg/{train,val}/{images,masks} + classes.yaml; or check real folders.

``seg_prepare.kind: demo`` generates the scenes (``ijepa.seg.synth``) into a temporary folder and swaps it in
only when complete. ``kind: folders`` generates nothing: it checks the folders named in ``seg_data`` (pairing
by stem, class config, every mask decoded) and reports unknown colours. Both write ``data/seg/scan.json``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ijepa.data.sources import find_fashion_mnist
from ijepa.seg.data import SegDataset, load_class_config
from ijepa.seg.synth import generate_scenes
from pipeline.outputs import write_json
from pipeline.params import section
from pipeline.stage import main

SECTIONS = ("seed", "seg_prepare", "seg_data", "tracking")
OUT = Path("data/seg")


def scan(root: Path, d) -> dict:
    """Pairing, class config and every mask of both splits; unknown colours counted per file."""
    classes = load_class_config(root / d.classes)
    report = {"classes": list(classes.names)}
    for split, folder in (("train", d.train_dir), ("val", d.val_dir)):
        ds = SegDataset(root / folder, classes, d.mask_format, (d.height, d.width), train=False)
        report[split] = {"pairs": len(ds), **ds.scan_masks()}
        if report[split]["unknown_pixels"]:
            files = report[split]["unknown_files"]
            print(
                f"seg_prepare: warning: {report[split]['unknown_pixels']} pixels in {len(files)} {split} masks have "
                f"colours not in {d.classes} (ignored, not background): {report[split]['unknown_colors']}"
            )
    return report


def run(params: dict, ctx, tracker) -> dict:
    p, d, seed = section(params, "seg_prepare"), section(params, "seg_data"), section(params, "seed")
    out = ctx.root / OUT
    manifest = {"kind": p.kind}
    if p.kind == "demo":
        tmp = out.with_name(out.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        fm = find_fashion_mnist(p.fashion_mnist_dir, ctx.root)
        manifest |= generate_scenes(
            tmp,
            fm,
            n_train=p.train_images,
            n_val=p.val_images,
            size=(p.height, p.width),
            n_items=p.items,
            item_scale=p.item_scale,
            seed=seed,
        )
        shutil.rmtree(out, ignore_errors=True)
        tmp.rename(out)
    report = scan(ctx.root, d)
    write_json(out / "scan.json", {"manifest": manifest, **report})
    metrics = {
        "train_pairs": report["train"]["pairs"],
        "val_pairs": report["val"]["pairs"],
        "classes": len(report["classes"]),
        "unknown_pixels": report["train"]["unknown_pixels"] + report["val"]["unknown_pixels"],
    }
    write_json(ctx.root / "metrics/seg_prepare.json", metrics)
    tracker.log_dict(report, "seg/scan.json")
    return metrics


if __name__ == "__main__":
    main("seg_prepare", run, SECTIONS)
