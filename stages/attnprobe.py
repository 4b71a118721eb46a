"""attnprobe: V-JEPA's attentive probe (a learned query cross-attends to all patch tokens, then a linear head)
on the patch tokens of the pretrained encoder, a random-init encoder of the same architecture and the raw
pixels' patches; one probe per lr, the best chosen on val and reported on test.

Two sources of tokens, by ``extract.tokens``: the token cache the extract stage wrote (small data: the demo),
or, with ``extract.tokens: false`` (ImageNet, whose cache would take 840 GB), tokens computed on the fly by the
frozen encoders from the shards, with extract's checkpoint, crop, loader and bf16 settings
(``ijepa.eval.attentive_stream``). The streaming path runs on several processes (torchrun, or
``make stage-slurm STAGE=attnprobe``), saves its probes after every epoch to ``models/resume/attnprobe.pt``
and resumes from there when rerun with the same params, checkpoint and shards (after a kill, a preemption or
SLURM's USR2, which it answers at the next epoch end).
"""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from ijepa.data import eval_loader, eval_transform, labelled_splits, pretrain_loader, read_manifest, shard_urls
from ijepa.data.transforms import Normalize
from ijepa.eval.attentive import train_attentive_probe
from ijepa.eval.attentive_stream import train_attentive_probes_streaming
from ijepa.eval.features import frozen_encoders, load_features
from pipeline.distributed import distributed_stage
from pipeline.outputs import ENCODER_COLORS, new_figure, save_figure, text_figure, write_json
from pipeline.params import ParamError, section
from pipeline.resume import EpochState, file_key, shards_key
from pipeline.stage import main
from pipeline.stagerun import StageRun

SECTIONS = ("seed", "attnprobe", "extract", "tracking")
FEATURES, SHARDS = Path("data/features"), Path("data/shards")
ENCODERS = ("pretrained", "random_init", "pixels")


def _tokens(root: Path, name: str) -> dict:
    path = root / FEATURES / f"tokens_{name}.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: the attentive probe reads the patch tokens that the extract stage keeps with "
            "extract.tokens: true (dvc repro extract); with extract.tokens: false it computes them from the shards"
        )
    return load_features(path)


def _optimisation(p) -> dict:
    """The probes' settings both token sources share."""
    return {k: getattr(p, k) for k in ("lrs", "num_heads", "epochs", "weight_decay", "warmup_epochs")}


def _cached(root: Path, p, seed: int, device) -> dict:
    """Every encoder's probes on the token cache, one encoder's tokens in memory at a time."""
    results, splits = {}, ("train", "val", "test")
    bar = tqdm(total=len(ENCODERS) * p.epochs, desc="attnprobe", mininterval=5)
    try:
        for name in ENCODERS:
            feats = _tokens(root, name)
            present = [s for s in splits if s in feats]
            results[name] = train_attentive_probe(
                {s: feats[s]["tokens"] for s in present},
                {s: feats[s]["labels"] for s in present},
                num_classes=len(feats["meta"]["classes"]),
                batch_size=p.batch_size,
                seed=seed,
                device=device,
                progress=lambda epoch: bar.update(1),
                **_optimisation(p),
            )
            del feats
    finally:  # an error starts on a line of its own
        bar.close()
    return results


def _streamed(params: dict, job: StageRun, p, ex, seed: int, device) -> tuple[dict | None, EpochState]:
    """Every encoder's probes on tokens computed from the shards (None: stopped for a preemption)."""
    ctx = job.ctx
    manifest = read_manifest(ctx.root / SHARDS)
    train = manifest["splits"]["train"]
    if p.batch_size % ctx.world_size:
        raise ParamError(f"attnprobe.batch_size: {p.batch_size} is not divisible by the {ctx.world_size} ranks")
    steps = train["count"] // p.batch_size
    if steps < 1:
        raise ParamError(f"attnprobe.batch_size: {p.batch_size} exceeds the {train['count']} training images")
    ckpt = ctx.root / ex.checkpoint
    encoders = frozen_encoders(ckpt, ex.which, seed, device) | {"pixels": None}
    transform = eval_transform(ex.crop_size or encoders["pretrained"].img_size[0], ex.resize_size)
    urls = {s: shard_urls(ctx.root / SHARDS, s) for s in labelled_splits(manifest)}
    shard = {"rank": ctx.rank, "world_size": ctx.world_size, "num_workers": ex.num_workers}
    shard |= {"stall_timeout": ex.stall_timeout_s, "transform": transform}
    normalize = Normalize()
    # what a resume file must match: every setting that changes a probe, the data and the encoder's weights
    state = job.state(params, ("seed", "attnprobe", "extract"), train=shards_key(train), checkpoint=file_key(ckpt))
    stream = {"batch_size": p.batch_size // ctx.world_size, "collator": None, "batches_per_epoch": steps}
    stream |= {"seed": seed, "counts": [s["count"] for s in train["shards"]], "name": "attnprobe loader (train)"}

    def train_batches(epoch):
        return pretrain_loader(urls["train"], epoch=epoch, **stream, **shard)

    def eval_batches(split):
        return eval_loader(urls[split], batch_size=ex.batch_size, name=f"attnprobe loader ({split})", **shard)

    bar = tqdm(total=steps * p.epochs, desc="attnprobe (streaming)", mininterval=5, disable=not ctx.is_main)
    try:
        results = train_attentive_probes_streaming(
            encoders,
            train_batches=train_batches,
            eval_batches=eval_batches,
            eval_splits=[s for s in ("val", "test") if s in urls],
            prepare=lambda x: normalize(x, device),
            num_classes=len(manifest["classes"]),
            steps_per_epoch=steps,
            seed=seed,
            device=device,
            bf16=ex.bf16,
            state=state,
            should_stop=job.should_stop,
            progress=lambda step: bar.update(1),
            **_optimisation(p),
        )
    finally:
        bar.close()
    return results, state


@distributed_stage("attnprobe.device")
def run(params: dict, ctx, tracker, device) -> dict:
    p, ex, seed = section(params, "attnprobe"), section(params, "extract"), section(params, "seed")
    if not p.enabled:  # the outputs exist either way (dvc.yaml lists them); they say the probe did not run
        if ctx.is_main:
            write_json(ctx.root / "metrics/attnprobe.json", {"enabled": False})
            text_figure(ctx.root / "plots/attnprobe.png", "attentive probe not run (attnprobe.enabled: false)")
        return {"enabled": 0}
    job, state = StageRun("attnprobe", ctx, tracker, device), None
    if ex.tokens:  # the cache holds every split: one process trains on it
        if not ctx.is_main:
            return {"world_size": ctx.world_size}
        results = _cached(ctx.root, p, seed, device)
    else:
        results, state = _streamed(params, job, p, ex, seed, device)
        if results is None:
            return job.stopped(state)
        if not ctx.is_main:
            return {"world_size": ctx.world_size}
    best = results["pretrained"]
    metrics = {
        "top1": best["test_top1"],
        "top5": best["test_top5"],
        "val_top1": best["val_top1"],
        "best_head": best["best"],
        "random_init_top1": results["random_init"]["test_top1"],
        "pixels_top1": results["pixels"]["test_top1"],
        "gap_vs_random_init": round(best["test_top1"] - results["random_init"]["test_top1"], 5),
        "tokens": "cache" if ex.tokens else "streamed",
    }
    tables = {"table": {n: r["table"] for n, r in results.items()}}
    job.publish(metrics | tables, plots=[_plot(results, ctx.root / "plots/attnprobe.png")])
    if state is not None:  # the outputs are written: the streaming run's state goes
        state.finish()
    return {k: v for k, v in metrics.items() if k not in ("best_head", "tokens")}


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
