"""linprobe: a grid of linear heads on cached features for the pretrained encoder, a random-init encoder
of the same architecture and raw pixels; best head chosen on val, reported on test."""

from __future__ import annotations

import csv
from pathlib import Path

from ijepa.eval.features import load_features
from ijepa.eval.linear import train_linear_grid
from pipeline.outputs import ENCODER_COLORS, new_figure, save_figure, write_json
from pipeline.params import section
from pipeline.stage import main

SECTIONS = ("seed", "linprobe", "tracking")
FEATURES = Path("data/features")


def _grid(feats: dict, poolings, p, seed: int, batchnorm) -> dict:
    splits = [s for s in ("train", "val", "test") if s in feats and s != "meta"]
    return train_linear_grid(
        {s: feats[s] for s in splits},
        {s: feats[s]["labels"] for s in splits},
        num_classes=len(feats["meta"]["classes"]),
        poolings=poolings,
        lrs=p.lrs,
        batchnorm=batchnorm,
        epochs=p.epochs,
        batch_size=p.batch_size,
        weight_decay=p.weight_decay,
        seed=seed,
    )


def run(params: dict, ctx, tracker) -> dict:
    p, seed = section(params, "linprobe"), section(params, "seed")
    results = {
        "pretrained": _grid(load_features(ctx.root / FEATURES / "pretrained.pt"), p.poolings, p, seed, p.batchnorm),
        "random_init": _grid(load_features(ctx.root / FEATURES / "random_init.pt"), p.poolings, p, seed, p.batchnorm),
        "pixels": _grid(load_features(ctx.root / FEATURES / "pixels.pt"), ["pixels"], p, seed, p.batchnorm),
    }
    table = ctx.root / "metrics/linprobe_grid.csv"
    rows = [{"encoder": name, **row} for name, r in results.items() for row in r["table"]]
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    best = results["pretrained"]
    metrics = {
        "top1": best["test_top1"],
        "top5": best["test_top5"],
        "val_top1": best["val_top1"],
        "best_head": best["best"],
        "random_init_top1": results["random_init"]["test_top1"],
        "pixels_top1": results["pixels"]["test_top1"],
        "random_init_best_head": results["random_init"]["best"],
        "pixels_best_head": results["pixels"]["best"],
    }
    write_json(ctx.root / "metrics/linprobe.json", metrics)
    png = _plot(rows, metrics, ctx.root / "plots/linprobe.png")
    tracker.log_artifact(table, "linprobe")
    tracker.log_artifact(png, "plots")
    return metrics


def _plot(rows: list[dict], metrics: dict, path: Path) -> Path:
    fig, axes = new_figure(1, 1, (max(6, 0.35 * len(rows)), 4))
    ax = axes[0, 0]
    ax.bar(range(len(rows)), [r["val_top1"] for r in rows], color=[ENCODER_COLORS[r["encoder"]] for r in rows])
    ax.set_xticks(range(len(rows)), [f"{r['encoder'][:6]} {r['head']}" for r in rows], rotation=90, fontsize=7)
    ax.set_ylabel("val top-1")
    lo = min(r["val_top1"] for r in rows)
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.set_title(
        f"linear-probe grid (test top-1: pretrained {metrics['top1']:.3f}, random init "
        f"{metrics['random_init_top1']:.3f}, pixels {metrics['pixels_top1']:.3f})",
        fontsize=9,
    )
    return save_figure(fig, path)


if __name__ == "__main__":
    main("linprobe", run, SECTIONS)
