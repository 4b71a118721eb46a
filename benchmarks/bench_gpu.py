"""GPU pretraining step at ImageNet scale: images/s and peak memory of one full I-JEPA step (forward,
backward, AdamW, EMA) for vit_base/16 and vit_huge/14 at 224 px with the paper's masks and predictors, in
bf16 autocast with ``scaled_dot_product_attention`` (flash / memory-efficient kernels where the GPU has
them), eager and under ``torch.compile``, side by side in one run. Median of ``--repeats`` steps after 3
warm-ups (and, compiled, after 3 compiling steps whose time is printed apart).

    python benchmarks/bench_gpu.py [--repeats 10] [--batch-base 128] [--batch-huge 32] [--no-compile]
    make bench-gpu

Without CUDA it says so and exits 0 (nothing is timed on the CPU here; ``bench_pretrain_step.py`` is the
CPU benchmark).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import fmt
from bench_pretrain_step import PAPER_MASKS, bench

from ijepa.pretrain import ModelSpec

VARIANTS = {  # name: (bf16, fused SDPA on the CPU (unused on CUDA), fused AdamW, torch.compile)
    "bf16 + SDPA": (True, False, False, False),
    "bf16 + SDPA + fused AdamW": (True, False, True, False),
    "bf16 + SDPA + torch.compile": (True, False, False, True),
}


def settings(batch_base: int, batch_huge: int) -> dict:
    return {
        "vit_base/16": dict(
            spec=ModelSpec(name="vit_base", patch_size=16, img_size=224, pred_depth=6, pred_emb_dim=384),
            batch=batch_base,
            masks=PAPER_MASKS,
        ),
        "vit_huge/14": dict(  # the official in1k_vith14_ep300 model: predictor 12 x 384, batch 128 per GPU
            spec=ModelSpec(name="vit_huge", patch_size=14, img_size=224, pred_depth=12, pred_emb_dim=384),
            batch=batch_huge,
            masks=PAPER_MASKS,
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--batch-base", type=int, default=128)
    ap.add_argument("--batch-huge", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile (minutes of compilation)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here: nothing timed (run it on a GPU node; CPU: bench_pretrain_step.py)")
        return 0
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    props = torch.cuda.get_device_properties(device)
    print(
        f"torch {torch.__version__}, {props.name} ({props.total_memory / 2**30:.0f} GiB), "
        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}, "
        f"flash SDPA {'on' if torch.backends.cuda.flash_sdp_enabled() else 'off'}"
    )
    variants = {k: v for k, v in VARIANTS.items() if not (v[3] and args.no_compile)}
    for label, setting in settings(args.batch_base, args.batch_huge).items():
        print(f"-- {label} @224, batch {setting['batch']}, paper masks")
        base = None
        for name, variant in variants.items():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            try:
                r = bench(setting, device, variant, args.repeats)
            except torch.OutOfMemoryError:
                print(f"{name:<52} out of memory at batch {setting['batch']}")
                continue
            sec = r["median"] / 1000
            base = base or sec
            peak = torch.cuda.max_memory_allocated(device) / 2**30
            print(f"{fmt(name, r)}   {setting['batch'] / sec:8.1f} img/s   peak {peak:6.1f} GiB   {base / sec:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
