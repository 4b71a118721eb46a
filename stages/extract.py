"""extract: frozen features of train / val / test for the probes, k-NN and search.

One pass per split computes three feature sets on the very same images and preprocessing: the chosen
encoder of the checkpoint (target encoder by default, the paper's choice; our pretraining or any official
.pth.tar), a randomly initialised encoder of the same architecture, and raw pixels (average-pooled to
``pixel_size``). With ``extract.tokens`` it also keeps the last layer's patch tokens (and the pixels'
patches) in float16, ``tokens_<name>.pt``, for the attentive probe.

Distributed: under ``torchrun --nproc_per_node N -m stages.extract`` (or ``make stage-slurm STAGE=extract``)
every rank extracts its own share of each split (every sample exactly once) and rank 0 gathers the shares,
orders them by key as a single process would, and alone writes.
"""

from __future__ import annotations

from pathlib import Path

from ijepa.data import eval_loader, eval_transform, labelled_splits, read_manifest, shard_urls
from ijepa.data.transforms import Normalize
from ijepa.distributed import gather_to_main
from ijepa.eval.features import extract_features, frozen_encoders, merge_features, save_features
from pipeline.distributed import distributed_stage
from pipeline.outputs import stored_path, write_json
from pipeline.params import section
from pipeline.stage import main

SECTIONS = ("seed", "extract", "tracking")
SHARDS, OUT = Path("data/shards"), Path("data/features")


@distributed_stage("extract.device")
def run(params: dict, ctx, tracker, device) -> dict:
    p, seed = section(params, "extract"), section(params, "seed")
    ckpt = ctx.root / p.checkpoint
    encoders = frozen_encoders(ckpt, p.which, seed, device)
    encoder = encoders["pretrained"]
    crop = p.crop_size or encoder.img_size[0]
    manifest = read_manifest(ctx.root / SHARDS)
    normalize = Normalize()
    out: dict[str, dict] = {"pretrained": {}, "random_init": {}, "pixels": {}}
    tokens: dict[str, dict] = {name: {} for name in out}
    for split in labelled_splits(manifest):  # not the unlabeled images, which only pretraining reads
        info = manifest["splits"][split]
        loader = eval_loader(
            shard_urls(ctx.root / SHARDS, split),
            batch_size=p.batch_size,
            transform=eval_transform(crop, p.resize_size),
            num_workers=p.num_workers,
            stall_timeout=p.stall_timeout_s,
            name=f"extract loader ({split})",
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        feats = extract_features(
            encoders,
            loader,
            prepare=lambda x: normalize(x, device),
            device=device,
            bf16=p.bf16,
            pixel_size=p.pixel_size,
            tokens=p.tokens,
            progress=f"extract {split}" if ctx.is_main else None,
            total=-(-info["count"] // (p.batch_size * ctx.world_size)),
        )
        shares = gather_to_main(feats)
        if shares is None:  # not rank 0: its share is handed over
            continue
        feats = merge_features(shares)
        for name, f in feats.items():
            if p.tokens:
                tokens[name][split] = {"tokens": f.pop("tokens"), "labels": f["labels"], "keys": f["keys"]}
            out[name][split] = f
    if not ctx.is_main:
        return {"world_size": ctx.world_size}
    meta = {
        "checkpoint": stored_path(ckpt, ctx.root),  # repo-relative: the same bytes in any clone
        "which": p.which,
        "arch": encoder.arch(),
        "crop_size": crop,
        "resize_size": p.resize_size or crop,
        "classes": manifest["classes"],
    }
    (ctx.root / OUT).mkdir(parents=True, exist_ok=True)
    for stale in (ctx.root / OUT).glob("tokens_*.pt"):  # tokens of an earlier run with tokens on
        stale.unlink()
    for name, feats in out.items():
        save_features(ctx.root / OUT / f"{name}.pt", feats, **meta, kind=name)
        if p.tokens:
            save_features(ctx.root / OUT / f"tokens_{name}.pt", tokens[name], **meta, kind=name)
    metrics = {f"{s}_samples": len(v["keys"]) for s, v in out["pretrained"].items()}
    metrics |= {
        "dim_avg_last": out["pretrained"]["train"]["avg_last"].shape[1],
        "dim_pixels": out["pixels"]["train"]["pixels"].shape[1],
    }
    write_json(ctx.root / "metrics/extract.json", metrics)
    tracker.log_dict(meta, "extract/meta.json")
    return metrics


if __name__ == "__main__":
    main("extract", run, SECTIONS)
