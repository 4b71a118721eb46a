"""One full I-JEPA training step (forward, backward, AdamW, EMA) on this machine's device.

Setting from the foundation issue: vit_tiny/16 at 224, batch 8, predictor depth 6 and width 384,
paper masks. Median of 15 timed steps after 3 warm-ups, every variant on the same replayed masks.

    python benchmarks/bench_pretrain_step.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import fmt, measure

from ijepa.device import pick_device
from ijepa.engine import build_optimizer, train_epoch
from ijepa.masks import MultiBlockMaskCollator
from ijepa.pretrain import ModelSpec, build_jepa
from ijepa.schedules import make_schedules

PAPER = dict(
    enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10
)


def bench(pred_depth: int, device: torch.device, bf16: bool) -> dict:
    jepa = build_jepa(ModelSpec("vit_tiny", 16, 224, pred_depth=pred_depth, pred_emb_dim=384), seed=0).to(device)
    opt = build_optimizer(jepa)
    sched = make_schedules(
        ipe=1000,
        epochs=1,
        warmup_epochs=0.1,
        start_lr=2e-4,
        lr=1e-3,
        final_lr=1e-6,
        weight_decay=0.04,
        final_weight_decay=0.4,
        ema=(0.996, 1.0),
    )
    coll = MultiBlockMaskCollator(224, 16, **PAPER)
    imgs = torch.randn(8, 3, 224, 224)
    batches = [(imgs, *coll.sample(8, s)) for s in range(18)]
    state = {"step": 0}

    def one_step():
        s = state["step"]
        train_epoch(
            jepa,
            opt,
            sched,
            [batches[s % len(batches)]],
            epoch=0,
            start_step=s,
            end_step=s + 1,
            device=device,
            bf16=bf16,
        )
        if device.type == "cuda":
            torch.cuda.synchronize()
        state["step"] += 1

    return measure(one_step, warmup=3, repeats=15)


def main() -> None:
    device = pick_device("auto")
    bf16 = device.type == "cuda"
    print(
        f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"{'bf16 autocast' if bf16 else 'fp32'}"
    )
    r6 = bench(6, device, bf16)
    print(fmt("train step vit_tiny/16@224 B=8, predictor 6 x 384", r6))
    r12 = bench(12, device, bf16)
    print(fmt("train step vit_tiny/16@224 B=8, predictor 12 x 384", r12))
    print(f"predictor depth 12 / depth 6: {r12['median'] / r6['median']:.2f}x")


if __name__ == "__main__":
    main()
