"""Demo pretraining with three ways of feeding it, side by side in one run: images/s of whole training steps
(loading, masks, normalisation, forward, backward, AdamW, EMA) and of the loader alone.

- ``stream, 1 worker``: ``ijepa.data.pretrain_loader`` over the shards with one DataLoader worker (the
  streaming path; on 2 cores the worker competes with the two torch threads);
- ``stream, main process``: the same loader with ``num_workers=0``;
- ``in memory``: ``ijepa.data.memory``: the split decoded once, batches cropped in the training process
  (``data.in_memory: true``, the demo's default). The one-off decode is timed apart.

Shards are prepared from Fashion-MNIST in a temporary folder (``--per-class`` training images per class), the
model is the demo's (vit_tiny x6 at 28 px / patch 4, predictor 4 x 96, 2 targets, batch 64, bf16 autocast
on the CPU). Medians over ``--repeats`` blocks of ``--steps`` steps.

    python benchmarks/bench_demo_loading.py [--per-class 500] [--steps 20] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from ijepa.data import find_fashion_mnist, prepare_fashion_mnist, pretrain_transform, shard_urls
from ijepa.data.memory import decode_split, epoch_batches
from ijepa.data.transforms import Normalize
from ijepa.engine import build_optimizer, train_epoch
from ijepa.masks import MultiBlockMaskCollator
from ijepa.pretrain import ModelSpec, build_jepa
from ijepa.schedules import make_schedules

BATCH = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-class", type=int, default=500)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    device = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        prepare_fashion_mnist(
            find_fashion_mnist(None), Path(tmp), val_fraction=0.0, max_per_class=args.per_class,
            test_max_per_class=1, shard_size=1000, progress=False,
        )  # fmt: skip
        urls = shard_urls(Path(tmp), "train")
        t0 = time.perf_counter()
        split = decode_split(urls)
        decode_s = time.perf_counter() - t0
        n = len(split)
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {n} training images in {len(urls)} shards"
        )
        print(f"in memory: decoding the split once took {decode_s:.2f} s ({n / decode_s:.0f} images/s)")
        ipe = args.steps
        transform = pretrain_transform(28, crop_scale=(0.8, 1.0))
        coll = MultiBlockMaskCollator(
            28, 4, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5),
            nenc=1, npred=2, min_keep=4,
        )  # fmt: skip
        normalize = Normalize()

        def loader(kind: str, epoch: int):  # the dispatch the pretrain stage uses
            return epoch_batches(
                split if kind == "in memory" else urls, collator=coll, batches_per_epoch=ipe, epoch=epoch,
                num_workers=1 if kind == "stream, 1 worker" else 0, batch_size=BATCH, transform=transform,
            )  # fmt: skip

        jepa = build_jepa(
            ModelSpec(
                name="vit_tiny", patch_size=4, img_size=28, pred_depth=4, pred_emb_dim=96, overrides={"depth": 6}
            ),
            0,
        )
        opt = build_optimizer(jepa)
        sched = make_schedules(
            ipe=ipe, epochs=1000, warmup_epochs=1, start_lr=5e-5, lr=1.5e-4, final_lr=1e-6,
            weight_decay=0.04, final_weight_decay=0.4, ema=(0.996, 1.0),
        )  # fmt: skip
        kinds = ("stream, 1 worker", "stream, main process", "in memory")
        train = {k: [] for k in kinds}
        alone = {k: [] for k in kinds}
        epoch = 0
        for _ in range(args.repeats + 1):  # the first round warms up
            for kind in kinds:
                t0 = time.perf_counter()
                for _batch in loader(kind, epoch):
                    pass
                alone[kind].append(ipe * BATCH / (time.perf_counter() - t0))
                batches = ((normalize(i, device), me, mp) for (i, _), me, mp in loader(kind, epoch + 1))
                t0 = time.perf_counter()
                train_epoch(
                    jepa, opt, sched, batches, epoch=epoch, start_step=(epoch + 1) * ipe, end_step=(epoch + 2) * ipe,
                    device=device, bf16=True,
                )  # fmt: skip
                train[kind].append(ipe * BATCH / (time.perf_counter() - t0))
                epoch += 2
        base = statistics.median(train[kinds[0]][1:])
        for kind in kinds:
            tr, lo = statistics.median(train[kind][1:]), statistics.median(alone[kind][1:])
            print(f"{kind:<22} training {tr:7.1f} images/s ({tr / base:.2f}x)   loader alone {lo:8.0f} images/s")


if __name__ == "__main__":
    main()
