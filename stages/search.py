"""search: an index of the train split's normalised embeddings, same-class retrieval metrics for the test
queries (recall@1, recall@5, mAP) and a picture grid of queries with their nearest neighbours."""

from __future__ import annotations

import json
from pathlib import Path

from ijepa.data import read_manifest, shard_urls
from ijepa.data.loaders import read_images
from ijepa.data.tario import tar_samples
from ijepa.eval.features import load_features
from ijepa.eval.search import SearchIndex, retrieval_metrics
from pipeline.outputs import write_json
from pipeline.params import section
from pipeline.stage import main

SECTIONS = ("search", "tracking")
FEATURES, SHARDS, INDEX = Path("data/features"), Path("data/shards"), Path("models/search/index.pt")


def _sources(manifest_dir: Path, split: str, keys: list[str]) -> list[str]:
    src = {}
    for s in tar_samples({"url": u} for u in shard_urls(manifest_dir, split)):
        src[s["__key__"]] = json.loads(s["json"])["source"]
    return [src[k] for k in keys]


def run(params: dict, ctx, tracker) -> dict:
    p = section(params, "search")
    feats = load_features(ctx.root / FEATURES / "pretrained.pt")
    query_split = "test" if "test" in feats else "val"
    gallery = feats["train"]
    meta = {k: feats["meta"][k] for k in ("checkpoint", "which", "arch", "crop_size", "resize_size", "classes")}
    index = SearchIndex(
        gallery[p.pooling],
        gallery["keys"],
        gallery["labels"],
        _sources(ctx.root / SHARDS, "train", gallery["keys"]),
        meta | {"pooling": p.pooling},
    )
    index.save(ctx.root / INDEX)
    if p.backend == "faiss":
        index.use_faiss()
    queries = feats[query_split]
    metrics = retrieval_metrics(index, queries[p.pooling], queries["labels"], ks=(1, 5))
    metrics = {k: round(v, 5) for k, v in metrics.items()} | {
        "queries": len(queries["keys"]),
        "gallery": len(gallery["keys"]),
    }
    write_json(ctx.root / "metrics/search.json", metrics)
    png = _grid(ctx.root, index, queries, query_split, p)
    tracker.log_artifact(png, "plots")
    return metrics


def _grid(root: Path, index: SearchIndex, queries: dict, split: str, p) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    manifest = read_manifest(root / SHARDS)
    step = max(1, len(queries["keys"]) // p.grid_queries)
    picks = list(range(0, len(queries["keys"]), step))[: p.grid_queries]
    scores, idx = index.search(queries[p.pooling][picks], p.k)
    q_imgs = read_images(shard_urls(root / SHARDS, split), [queries["keys"][i] for i in picks])
    g_keys = sorted({index.keys[j] for j in idx.flatten().tolist()})
    g_imgs = read_images(shard_urls(root / SHARDS, "train"), g_keys)
    classes = manifest["classes"]
    fig, axes = plt.subplots(len(picks), p.k + 1, figsize=(1.6 * (p.k + 1), 1.7 * len(picks)), squeeze=False)
    for r, qi in enumerate(picks):
        qlabel = int(queries["labels"][qi])
        axes[r][0].imshow(q_imgs[queries["keys"][qi]].permute(1, 2, 0).numpy())
        axes[r][0].set_title(f"query: {classes[qlabel]}", fontsize=7, color="tab:blue")
        for c in range(p.k):
            j = int(idx[r, c])
            axes[r][c + 1].imshow(g_imgs[index.keys[j]].permute(1, 2, 0).numpy())
            ok = int(index.labels[j]) == qlabel
            axes[r][c + 1].set_title(
                f"{float(scores[r, c]):.2f} {classes[int(index.labels[j])]}",
                fontsize=6,
                color="tab:green" if ok else "tab:red",
            )
    for ax in axes.flatten():
        ax.axis("off")
    fig.suptitle("nearest neighbours in the train split (cosine; green = same class)", fontsize=9)
    fig.tight_layout()
    path = root / "plots/search_grid.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


if __name__ == "__main__":
    main("search", run, SECTIONS)
