"""Mask collator: the vectorised ijepa.masks collator vs a straightforward per-image loop, side by side.

Settings: the paper's (1 context block of scale 0.85-1, 4 targets of 0.15-0.2, aspect 0.75-1.5,
min_keep 10), batch 128 of 3x224x224 images, 224/16 (14x14 grid) and 224/14 (16x16).

    python benchmarks/bench_collator.py
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
from torch.utils.data import default_collate

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import fmt, measure

from ijepa.masks import MultiBlockMaskCollator

PAPER = dict(
    enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10
)


class LoopCollator:
    """The same semantics written as upstream does: a Python loop over images and blocks, one draw at a time."""

    def __init__(self, grid: int, **kw):
        self.h = self.w = grid
        self.kw = kw
        self.step = 0

    def _size(self, g, scale, ratio):
        u = torch.rand(1, generator=g).item()
        keep = int(self.h * self.w * (scale[0] + u * (scale[1] - scale[0])))
        ar = ratio[0] + u * (ratio[1] - ratio[0])
        return min(round(math.sqrt(keep * ar)), self.h), min(round(math.sqrt(keep / ar)), self.w)

    def _block(self, g, size, regions=None):
        h, w = size
        tries, fails = 0, 0
        while True:
            top = int(torch.randint(0, self.h - h + 1, (1,), generator=g))
            left = int(torch.randint(0, self.w - w + 1, (1,), generator=g))
            mask = torch.zeros(self.h, self.w, dtype=torch.int32)
            mask[top : top + h, left : left + w] = 1
            if regions:
                for r in regions[: len(regions) - tries]:
                    mask *= r
            idx = torch.nonzero(mask.flatten()).squeeze(1)
            if len(idx) > self.kw["min_keep"]:
                comp = torch.ones(self.h, self.w, dtype=torch.int32)
                comp[top : top + h, left : left + w] = 0
                return idx, comp
            fails += 1
            if fails % 20 == 0:
                tries += 1

    def __call__(self, batch):
        collated = default_collate(batch)
        g = torch.Generator().manual_seed(self.step)
        self.step += 1
        p_size = self._size(g, self.kw["pred_mask_scale"], self.kw["aspect_ratio"])
        e_size = self._size(g, self.kw["enc_mask_scale"], (1.0, 1.0))
        enc, pred = [], []
        for _ in range(len(batch)):
            blocks = [self._block(g, p_size) for _ in range(self.kw["npred"])]
            pred.append([b[0] for b in blocks])
            enc.append([self._block(g, e_size, [b[1] for b in blocks])[0] for _ in range(self.kw["nenc"])])
        k_pred = min(len(m) for ms in pred for m in ms)
        k_enc = min(len(m) for ms in enc for m in ms)
        masks_pred = [torch.stack([ms[i][:k_pred] for ms in pred]) for i in range(self.kw["npred"])]
        masks_enc = [torch.stack([ms[i][:k_enc] for ms in enc]) for i in range(self.kw["nenc"])]
        return collated, masks_enc, masks_pred


def bench_grid(patch: int, batch: list) -> None:
    """Time both collators on one grid and print the medians and ratios."""
    vec = MultiBlockMaskCollator(224, patch, **PAPER)
    loop = LoopCollator(224 // patch, **PAPER)
    tiny = [(torch.zeros(1), 0) for _ in range(len(batch))]  # masks cost alone, nothing to stack
    stacking = measure(lambda: default_collate(batch))
    r_loop = measure(lambda: loop(batch))
    r_vec = measure(lambda: vec(batch))
    r_loop_masks = measure(lambda: loop(tiny), repeats=30)
    r_vec_masks = measure(lambda: vec(tiny), repeats=30)
    print(f"-- 224/{patch} ({224 // patch}x{224 // patch} grid)")
    print(fmt("default_collate alone (image stacking)", stacking))
    print(fmt("per-image loop collator", r_loop))
    print(fmt("vectorised collator (ijepa.masks)", r_vec))
    print(fmt("per-image loop, masks only", r_loop_masks))
    print(fmt("vectorised, masks only", r_vec_masks))
    print(
        f"masks: vectorised is {r_loop_masks['median'] / r_vec_masks['median']:.1f}x faster; "
        f"whole collate {r_loop['median'] / r_vec['median']:.2f}x; masks are "
        f"{100 * r_vec_masks['median'] / r_vec['median']:.0f}% of the vectorised collate"
    )


def main() -> None:
    torch.set_num_threads(1)  # as in a data-loader worker
    batch = [(torch.zeros(3, 224, 224), 0) for _ in range(128)]
    print(f"torch {torch.__version__}, 1 thread, batch 128 of 3x224x224, paper mask settings")
    for patch in (16, 14):
        bench_grid(patch, batch)


if __name__ == "__main__":
    main()
