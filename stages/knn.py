"""knn: weighted k-NN (cosine, T = 0.07) on cached features, train as the memory bank; val and test top-1."""

from __future__ import annotations

from pathlib import Path

from ijepa.eval.features import load_features
from ijepa.eval.knn import knn_accuracy
from pipeline.outputs import write_json
from pipeline.params import section
from pipeline.stage import main

SECTIONS = ("knn", "tracking")
FEATURES = Path("data/features")


def _accuracies(feats: dict, p) -> dict[str, dict[str, float]]:
    out = {}
    for split in ("val", "test"):
        if split in feats:
            acc = knn_accuracy(
                feats["train"][p.pooling],
                feats["train"]["labels"],
                feats[split][p.pooling],
                feats[split]["labels"],
                num_classes=len(feats["meta"]["classes"]),
                ks=p.ks,
                temperature=p.temperature,
            )
            out[split] = {f"k{k}": round(v, 5) for k, v in acc.items()}
    return out


def run(params: dict, ctx, tracker) -> dict:
    p = section(params, "knn")
    pre = _accuracies(load_features(ctx.root / FEATURES / "pretrained.pt"), p)
    rnd = _accuracies(load_features(ctx.root / FEATURES / "random_init.pt"), p)
    metrics = {
        "top1": pre.get("test", pre["val"]),
        "val_top1": pre["val"],
        "random_init_top1": rnd.get("test", rnd["val"]),
        "pooling": p.pooling,
        "temperature": p.temperature,
    }
    write_json(ctx.root / "metrics/knn.json", metrics)
    for k, v in metrics["top1"].items():
        tracker.log_metrics({f"top1_{k}": v, f"random_init_top1_{k}": metrics["random_init_top1"][k]})
    return {f"top1_{k}": v for k, v in metrics["top1"].items()}


if __name__ == "__main__":
    main("knn", run, SECTIONS)
