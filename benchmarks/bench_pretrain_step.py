"""One full I-JEPA training step (forward, backward, AdamW, EMA): images/s and achieved GFLOP/s, side by side
with what this machine reaches on a large matmul of the same dtype, measured in the same run.

Two settings:
- the demo (``make repro``): vit_tiny width with 6 blocks at 28 px / patch 4, batch 64, predictor 4 x 96,
  2 target blocks (params/model/vit_demo.yaml, params/mask/demo.yaml);
- the foundation issue's: vit_tiny/16 at 224, batch 8, predictor 6 x 384, paper masks.

Variants, each on the same replayed masks and weights:
- ``fp32 + SDPA``: the step before the speed work (fp32, ``F.scaled_dot_product_attention`` on the CPU too),
  which ran at the official implementation's speed: the baseline every ratio is taken against;
- ``fp32``: the project's fp32 path (attention written out on the CPU, ``ijepa.models.vit.attention``);
- ``bf16 + SDPA``: bf16 autocast with the fused CPU attention kernel;
- ``bf16``: the project's default (``optim.bf16: true``: bf16 autocast, attention written out on the CPU);
- ``bf16 + fused AdamW``: the same with ``torch.optim.AdamW(fused=True)``;
- with ``--compile``, ``bf16 + torch.compile``: ``torch.compile(dynamic=True)`` (mask lengths change every
  batch, so static shapes would recompile); the first steps' compile time is printed apart.

FLOPs of a step are counted once with ``torch.utils.flop_counter`` (matmuls and attention; a multiply-add is
2 FLOPs). Median of ``--repeats`` timed steps after 3 warm-ups.

    python benchmarks/bench_pretrain_step.py [--repeats 15] [--skip-224] [--compile]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import fmt, measure

import ijepa.models.vit as vit
from ijepa.device import pick_device
from ijepa.engine import build_optimizer, train_epoch
from ijepa.masks import MultiBlockMaskCollator
from ijepa.pretrain import ModelSpec, build_jepa
from ijepa.schedules import make_schedules

PAPER_MASKS = dict(
    enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10
)
DEMO_MASKS = dict(PAPER_MASKS, npred=2, min_keep=4)
SETTINGS = {
    "demo": dict(
        spec=ModelSpec(
            name="vit_tiny", patch_size=4, img_size=28, pred_depth=4, pred_emb_dim=96, overrides={"depth": 6}
        ),
        batch=64,
        masks=DEMO_MASKS,
        label="demo: vit_tiny x6 @28/4, B=64, pred 4x96",
    ),
    "224": dict(
        spec=ModelSpec(name="vit_tiny", patch_size=16, img_size=224, pred_depth=6, pred_emb_dim=384),
        batch=8,
        masks=PAPER_MASKS,
        label="vit_tiny/16 @224, B=8, pred 6x384",
    ),
}
VARIANTS = {  # name: (bf16, fused SDPA on the CPU, fused AdamW, torch.compile)
    "fp32 + SDPA (baseline)": (False, True, False, False),
    "fp32": (False, False, False, False),
    "bf16 + SDPA": (True, True, False, False),
    "bf16 (default)": (True, False, False, False),
    "bf16 + fused AdamW": (True, False, True, False),
}
COMPILED = {"bf16 + torch.compile": (True, False, False, True)}
_WRITTEN_OUT = vit.attention


def _sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v)


def machine_gflops(dtype: torch.dtype, n: int = 2048) -> float:
    """GFLOP/s of an n x n x n matmul in ``dtype`` on the CPU (median of 10)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    r = measure(lambda: torch.mm(a, b), warmup=3, repeats=10)
    return 2 * n**3 / (r["median"] / 1000) / 1e9


def _setup(setting: dict, device: torch.device, fused_adamw: bool):
    jepa = build_jepa(setting["spec"], seed=0).to(device)
    opt = build_optimizer(jepa)
    if fused_adamw:
        opt = torch.optim.AdamW(jepa.param_groups(), lr=0.0, betas=(0.9, 0.999), eps=1e-8, fused=True)
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
    spec, bs = setting["spec"], setting["batch"]
    coll = MultiBlockMaskCollator(spec.img_size, spec.patch_size, **setting["masks"])
    gen = torch.Generator().manual_seed(0)
    imgs = torch.randn(bs, 3, spec.img_size, spec.img_size, generator=gen).to(device)
    batches = [(imgs, *coll.sample(bs, s)) for s in range(20)]
    return jepa, opt, sched, batches


def step_flops(setting: dict, device: torch.device) -> float:
    """FLOPs of one forward + backward, averaged over the replayed masks' first 5 batches."""
    jepa, _, _, batches = _setup(setting, device, False)
    counter = FlopCounterMode(display=False)
    with counter:
        for imgs, me, mp in batches[:5]:
            jepa(imgs, me, mp)["loss"].backward()
    return counter.get_total_flops() / 5


class _Compiled(torch.nn.Module):
    """``torch.compile`` of the JEPA forward; the EMA update stays eager."""

    def __init__(self, jepa):
        super().__init__()
        self.jepa, self.fwd = jepa, torch.compile(jepa, dynamic=True)

    def forward(self, *args):
        return self.fwd(*args)

    def update_target(self, momentum: float) -> None:
        self.jepa.update_target(momentum)


def bench(setting: dict, device: torch.device, variant: tuple, repeats: int):
    bf16, fused_sdpa, fused_adamw, compiled = variant
    vit.attention = _sdpa if fused_sdpa else _WRITTEN_OUT
    try:
        jepa, opt, sched, batches = _setup(setting, device, fused_adamw)
        if compiled:
            jepa = _Compiled(jepa)
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

        if compiled:  # compilation happens in the first steps (and again when shapes specialise)
            t0 = time.perf_counter()
            for _ in range(3):
                one_step()
            print(f"  torch.compile: the first 3 steps took {time.perf_counter() - t0:.1f} s")
        return measure(one_step, warmup=3, repeats=repeats)
    finally:
        vit.attention = _WRITTEN_OUT


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--skip-224", action="store_true", help="time the demo setting only")
    ap.add_argument("--compile", action="store_true", help="also time torch.compile (minutes of compilation)")
    args = ap.parse_args()
    device = pick_device("auto")
    print(f"torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}")
    peak = {"fp32": machine_gflops(torch.float32), "bf16": machine_gflops(torch.bfloat16)}
    print(f"machine: 2048^3 matmul  fp32 {peak['fp32']:.0f} GFLOP/s   bf16 {peak['bf16']:.0f} GFLOP/s")
    for key, setting in SETTINGS.items():
        if key == "224" and args.skip_224:
            continue
        flops = step_flops(setting, device)
        print(f"-- {setting['label']}: {flops / 1e9:.1f} GFLOP per step")
        base = None
        for name, variant in (VARIANTS | (COMPILED if args.compile else {})).items():
            r = bench(setting, device, variant, args.repeats)
            bf16 = variant[0]
            sec = r["median"] / 1000
            base = base or sec
            dtype = "bf16" if bf16 else "fp32"
            print(
                f"{fmt(name, r)}   {setting['batch'] / sec:7.1f} img/s  {flops / sec / 1e9:6.1f} GFLOP/s "
                f"({100 * flops / sec / 1e9 / peak[dtype]:.0f}% of {dtype} matmul)  {base / sec:.2f}x"
            )


if __name__ == "__main__":
    main()
