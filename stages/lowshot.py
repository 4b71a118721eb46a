"""lowshot: linear probes trained on a few labelled images (k per class, and a fraction of the train split),
several seeded subsets each, for the pretrained encoder, a random-init encoder and raw pixels; test top-1
mean and spread over subsets (``metrics/lowshot.json``)."""

from __future__ import annotations

from pathlib import Path

from ijepa.eval.features import load_features
from ijepa.eval.lowshot import lowshot_probe, protocols
from pipeline.outputs import ENCODER_COLORS, new_figure, save_figure, write_json
from pipeline.params import section
from pipeline.stage import main

SECTIONS = ("seed", "lowshot", "tracking")
FEATURES = Path("data/features")
ENCODERS = {"pretrained": None, "random_init": None, "pixels": ("pixels",)}  # None: lowshot.poolings


def run(params: dict, ctx, tracker) -> dict:
    p, seed = section(params, "lowshot"), section(params, "seed")
    protos = protocols(p.shots, p.fractions)
    table: dict[str, dict[str, dict]] = {proto: {} for proto in protos}
    for name, poolings in ENCODERS.items():
        feats = load_features(ctx.root / FEATURES / f"{name}.pt")
        for proto, subset in protos.items():
            table[proto][name] = lowshot_probe(
                feats,
                num_classes=len(feats["meta"]["classes"]),
                protocol=subset,
                subsets=p.subsets,
                poolings=poolings or p.poolings,
                seed=seed,
                lrs=p.lrs,
                batchnorm=p.batchnorm,
                epochs=p.epochs,
                batch_size=p.batch_size,
            )
            r = table[proto][name]
            print(f"lowshot: {proto:>6} {name:<12} {r['mean']:.4f} +- {r['sd']:.4f} ({r['train_images']} images)")
    write_json(ctx.root / "metrics/lowshot.json", table)
    tracker.log_artifact(_plot(table, ctx.root / "plots/lowshot.png"), "plots")
    flat = {}
    for proto, row in table.items():
        for name, r in row.items():
            flat |= {f"{proto}_{name}_mean": round(r["mean"], 5), f"{proto}_{name}_sd": round(r["sd"], 5)}
    return flat


def _plot(table: dict, path: Path) -> Path:
    fig, axes = new_figure(1, 1, (6.5, 3.6))
    ax = axes[0, 0]
    protos = list(table)
    width = 0.8 / len(ENCODERS)
    for i, name in enumerate(ENCODERS):
        xs = [j + (i - (len(ENCODERS) - 1) / 2) * width for j in range(len(protos))]
        means = [table[p][name]["mean"] for p in protos]
        sds = [table[p][name]["sd"] for p in protos]
        ax.bar(xs, means, width, yerr=sds, capsize=3, color=ENCODER_COLORS[name], label=name)
    ax.set_xticks(range(len(protos)), [f"{p} ({table[p]['pretrained']['train_images']} img)" for p in protos])
    ax.set_ylabel("test top-1 (mean +- sd over subsets)")
    ax.set_ylim(0.0, 1.0)
    ax.legend(fontsize=8, loc="upper left")
    return save_figure(fig, path, "low-shot linear probes")


if __name__ == "__main__":
    main("lowshot", run, SECTIONS)
