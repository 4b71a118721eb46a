"""prepare: an ImageFolder tree or Fashion-MNIST -> data/shards/<split>/shard-*.tar + manifest.json."""

from __future__ import annotations

from pathlib import Path

from ijepa.data import find_fashion_mnist, prepare_fashion_mnist, prepare_image_folder
from ijepa.data.shards import SplitTooSmall
from pipeline.outputs import write_json
from pipeline.params import section
from pipeline.schema import ParamError
from pipeline.stage import main

SECTIONS = ("seed", "prepare", "tracking")
OUT = Path("data/shards")


def _path(root: Path, p: str | None, key: str) -> Path | None:
    """A source path from params, relative to the project; a missing one is an error naming its key."""
    if p is None:
        return None
    path = root / p if not Path(p).is_absolute() else Path(p)
    if not path.is_dir():
        raise ParamError(f"{key}: {path} is not a folder (does not exist, or is a file)")
    return path


def run(params: dict, ctx, tracker) -> dict:
    p, seed = section(params, "prepare"), section(params, "seed")
    if p.val_fraction == 0:  # caught here, not after pretraining: every probe picks its head on val
        raise ParamError(
            "prepare.val_fraction: 0 carves no validation split, and linprobe, attnprobe, lowshot and knn choose "
            "their heads on it; set it so that every class gets at least one image"
        )
    common = dict(
        val_fraction=p.val_fraction,
        max_per_class=p.max_per_class,
        unlabeled_per_class=p.unlabeled_per_class,
        seed=seed,
        shard_size=p.shard_size,
        workers=p.workers,
    )
    try:
        if p.source.kind == "fashion_mnist":
            src = find_fashion_mnist(_path(ctx.root, p.source.dir, "prepare.source.dir"), project_root=ctx.root)
            manifest = prepare_fashion_mnist(src, ctx.root / OUT, test_max_per_class=p.test_max_per_class, **common)
        else:
            train_dir = _path(ctx.root, p.source.train_dir, "prepare.source.train_dir")
            test_dir = _path(ctx.root, p.source.test_dir, "prepare.source.test_dir")
            manifest = prepare_image_folder(train_dir, ctx.root / OUT, test_dir=test_dir, **common)
    except SplitTooSmall as e:  # before any shard is written: the previous shards stay
        raise ParamError(f"prepare.{e.setting}: {e}") from e
    metrics = {f"{split}_images": info["count"] for split, info in manifest["splits"].items()}
    metrics |= {
        "classes": len(manifest["classes"]),
        "skipped": len(manifest["skipped"]),
        "warnings": len(manifest["warnings"]),
    }
    write_json(ctx.root / "metrics/prepare.json", metrics)
    tracker.log_artifact(ctx.root / OUT / "manifest.json", "data")
    return metrics


if __name__ == "__main__":
    main("prepare", run, SECTIONS)
