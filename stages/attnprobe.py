"""attnprobe: V-JEPA's attentive probe (a learned query cross-attends to all patch tokens, then a linear head)
on the cached tokens of the pretrained encoder, a random-init encoder of the same architecture and the raw
pixels' patches; one probe per lr, the best chosen on val and reported on test. Needs ``extract.tokens``."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ijepa.device import pick_device
from ijepa.eval.attentive import train_attentive_probe
from ijepa.eval.features import load_features
from pipeline.outputs import ENCODER_COLORS, new_figure, save_figure, text_figure, write_json
from pipeline.params import section
from pipeline.stage import main

SECTIONS = ("seed", "attnprobe", "tracking")
FEATURES = Path("data/features")
ENCODERS = ("pretrained", "random_init", "pixels")


def _tokens(root: Path, name: str) -> dict:
    path = root / FEATURES / f"tokens_{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the attentive probe reads the patch tokens that the extract stage keeps with "
            "extract.tokens: true (dvc repro extract)"
        )
    return load_features(path)


def run(params: dict, ctx, tracker) -> dict:
    p, seed = section(params, "attnprobe"), section(params, "seed")
    if not p.enabled:  # the outputs exist either way (dvc.yaml lists them); they say the probe did not run
        write_json(ctx.root / "metrics/attnprobe.json", {"enabled": False})
        text_figure(ctx.root / "plots/attnprobe.png", "attentive probe not run (attnprobe.enabled: false)")
        return {"enabled": 0}
    device = pick_device(p.device)
    results, splits = {}, ("train", "val", "test")
    bar = tqdm(total=len(ENCODERS) * len(p.lrs) * p.epochs, desc="attnprobe", mininterval=5)
    try:
        for name in ENCODERS:
            feats = _tokens(ctx.root, name)
            present = [s for s in splits if s in feats]
            results[name] = train_attentive_probe(
                {s: feats[s]["tokens"] for s in present},
                {s: feats[s]["labels"] for s in present},
                num_classes=len(feats["meta"]["classes"]),
                lrs=p.lrs,
                num_heads=p.num_heads,
                epochs=p.epochs,
                batch_size=p.batch_size,
                weight_decay=p.weight_decay,
                warmup_epochs=p.warmup_epochs,
                seed=seed,
                device=device,
                progress=lambda lr, epoch: bar.update(1),
            )
            del feats
    finally:  # an error starts on a line of its own
        bar.close()
    best = results["pretrained"]
    metrics = {
        "top1": best["test_top1"],
        "top5": best["test_top5"],
        "val_top1": best["val_top1"],
        "best_head": best["best"],
        "random_init_top1": results["random_init"]["test_top1"],
        "pixels_top1": results["pixels"]["test_top1"],
        "gap_vs_random_init": round(best["test_top1"] - results["random_init"]["test_top1"], 5),
    }
    write_json(ctx.root / "metrics/attnprobe.json", metrics | {"table": {n: r["table"] for n, r in results.items()}})
    tracker.log_artifact(_plot(results, ctx.root / "plots/attnprobe.png"), "plots")
    return {k: v for k, v in metrics.items() if k != "best_head"}


def _plot(results: dict, path: Path) -> Path:
    fig, axes = new_figure(1, 1, (6.5, 3.6))
    ax = axes[0, 0]
    lrs = [r["lr"] for r in results["pretrained"]["table"]]
    width = 0.8 / len(results)
    for i, (name, res) in enumerate(results.items()):
        xs = [j + (i - (len(results) - 1) / 2) * width for j in range(len(lrs))]
        ax.bar(
            xs,
            [r["val_top1"] for r in res["table"]],
            width,
            color=ENCODER_COLORS[name],
            label=f"{name} (test {res['test_top1']:.3f})",
        )
    ax.set_xticks(range(len(lrs)), [f"lr {lr:g}" for lr in lrs])
    ax.set_ylabel("val top-1")
    lo = min(r["val_top1"] for res in results.values() for r in res["table"])
    ax.set_ylim(max(0.0, lo - 0.05), 1.0)
    ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path, "attentive probe on frozen patch tokens (best lr on val, its test top-1)")


if __name__ == "__main__":
    main("attnprobe", run, SECTIONS)
