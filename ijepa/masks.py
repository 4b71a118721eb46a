"""Multi-block masking (I-JEPA), vectorised over the batch.

Semantics follow the official ``src/masks/multiblock.py``:
- one target-block size and one context-block size per batch, drawn from a generator seeded by a
  step counter (so every rank and worker agrees on sizes, and a resumed run draws the same ones);
  as upstream, a single uniform draws both the scale and the aspect ratio of a block;
- ``npred`` target blocks per image, placed freely; ``nenc`` context blocks restricted to the
  complement of that image's target blocks (unless ``allow_overlap``), re-drawn until they keep more
  than ``min_keep`` patches, dropping the last target constraint after every 20 failures;
- all masks of a kind are truncated to the batch minimum in raster order, so they stack into
  (B, K) index tensors: a list of ``nenc`` context masks and a list of ``npred`` target masks.

Deliberate differences (upstream bugs):
- blocks may touch the last patch row and column: tops are drawn from ``[0, H - h]`` inclusive and a block
  may span the full side (upstream's exclusive ``randint`` bound and ``while h >= H`` never mask them,
  PR #40/#59, issue #60);
- block positions come from a generator seeded by (seed, step, rank) instead of the global RNG, so
  masks are reproducible and resumable and do not depend on worker scheduling;
- settings under which a valid mask cannot exist (upstream then loops forever) fail at construction.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info

_RELAX_EVERY = 20  # failed draws before one target constraint is dropped (upstream value)


def _seed(*parts: int) -> int:
    """A 32-bit seed from several integers (torch's CPU generator ignores seed bits above 32)."""
    digest = hashlib.blake2b(",".join(str(int(p)) for p in parts).encode(), digest_size=4).digest()
    return int.from_bytes(digest, "little")


def _pair(x: Sequence[float], name: str, low: float, high: float) -> tuple[float, float]:
    if len(x) != 2:
        raise ValueError(f"{name} must be a (min, max) pair, got {x}")
    a, b = float(x[0]), float(x[1])
    if not (low <= a <= b <= high):
        raise ValueError(f"{name}={list(x)} must satisfy {low} <= min <= max <= {high}")
    return a, b


class MultiBlockMaskCollator:
    """Collate function producing ``(collated_batch, masks_enc, masks_pred)`` as upstream.

    Args:
        input_size: image side or (H, W) in pixels.
        patch_size: patch side; the token grid is (H / p, W / p).
        enc_mask_scale: range of the context block's area as a fraction of the grid.
        pred_mask_scale: range of each target block's area.
        aspect_ratio: range of the target blocks' height / width (the context block is square).
        nenc, npred: context and target blocks per image.
        min_keep: a mask must keep strictly more patches than this.
        allow_overlap: let context blocks overlap target blocks.
        seed: base seed; the masks of step s depend only on (seed, s, rank).
        rank: distributed rank (positions differ per rank, sizes do not).

    The step of each call is ``start_step + calls * num_workers + worker_id``, which matches the order in
    which a DataLoader hands out batches; call ``set_start_step`` with the global step before creating
    a loader iterator (e.g. at every epoch and on resume).
    """

    def __init__(
        self,
        input_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        enc_mask_scale: Sequence[float] = (0.2, 0.8),
        pred_mask_scale: Sequence[float] = (0.2, 0.8),
        aspect_ratio: Sequence[float] = (0.3, 3.0),
        nenc: int = 1,
        npred: int = 2,
        min_keep: int = 4,
        allow_overlap: bool = False,
        seed: int = 0,
        rank: int = 0,
    ):
        size = (input_size, input_size) if isinstance(input_size, int) else tuple(input_size)
        if len(size) != 2 or patch_size <= 0 or size[0] % patch_size or size[1] % patch_size:
            raise ValueError(f"input size {size} is not divisible by patch size {patch_size}")
        self.height, self.width = size[0] // patch_size, size[1] // patch_size
        self.enc_mask_scale = _pair(enc_mask_scale, "enc_mask_scale", 0.0, 1.0)
        self.pred_mask_scale = _pair(pred_mask_scale, "pred_mask_scale", 0.0, 1.0)
        self.aspect_ratio = _pair(aspect_ratio, "aspect_ratio", 1e-6, math.inf)
        if nenc < 1 or npred < 1:
            raise ValueError(f"nenc and npred must be >= 1, got nenc={nenc}, npred={npred}")
        if min_keep < 0:
            raise ValueError(f"min_keep must be >= 0, got {min_keep}")
        self.nenc, self.npred, self.min_keep = int(nenc), int(npred), int(min_keep)
        self.allow_overlap = bool(allow_overlap)
        self.seed, self.rank = int(seed), int(rank)
        self._start, self._calls = 0, 0
        self._check_feasible()

    # -- sizes -----------------------------------------------------------------------------------
    def _size_from_uniform(self, u: float | np.ndarray, scale, ratio):
        s = scale[0] + u * (scale[1] - scale[0])
        keep = np.floor(self.height * self.width * np.asarray(s, dtype=np.float64))
        ar = ratio[0] + u * (ratio[1] - ratio[0])
        # np.round is round-half-even like Python's round(), which upstream uses.
        h = np.minimum(np.round(np.sqrt(keep * ar)), self.height).astype(np.int64)
        w = np.minimum(np.round(np.sqrt(keep / ar)), self.width).astype(np.int64)
        return h, w

    def _check_feasible(self) -> None:
        """Reject settings under which some draw could never yield a valid mask (upstream hangs)."""
        u = np.linspace(0.0, 1.0, 100_001)
        for name, scale, ratio in (
            ("pred_mask_scale", self.pred_mask_scale, self.aspect_ratio),
            ("enc_mask_scale", self.enc_mask_scale, (1.0, 1.0)),
        ):
            h, w = self._size_from_uniform(u, scale, ratio)
            i = int(np.argmin(h * w))
            if h[i] * w[i] <= self.min_keep:
                raise ValueError(
                    f"{name}={list(scale)} on a {self.height}x{self.width} patch grid gives blocks of "
                    f"{h[i]}x{w[i]} = {h[i] * w[i]} patches, but min_keep={self.min_keep} requires more; "
                    "raise the scale, use a finer grid (larger image or smaller patch) or lower min_keep"
                )

    def _block_size(self, g: torch.Generator, scale, ratio) -> tuple[int, int]:
        u = torch.rand(1, generator=g).item()
        h, w = self._size_from_uniform(u, scale, ratio)
        return int(h), int(w)

    # -- positions -------------------------------------------------------------------------------
    def _boxes(self, g: torch.Generator, n: int, k: int, h: int, w: int) -> torch.Tensor:
        """(n, k, H, W) boolean masks of k random h x w blocks per image."""
        top = torch.randint(0, self.height - h + 1, (n, k, 1), generator=g)
        left = torch.randint(0, self.width - w + 1, (n, k, 1), generator=g)
        rows = torch.arange(self.height)
        cols = torch.arange(self.width)
        rmask = (rows >= top) & (rows < top + h)
        cmask = (cols >= left) & (cols < left + w)
        return rmask.unsqueeze(-1) & cmask.unsqueeze(-2)

    def _context_block(self, g: torch.Generator, targets: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(B, H, W) context masks avoiding ``targets`` (B, npred, H, W), with upstream's relaxation."""
        b = targets.shape[0]
        cand = self._boxes(g, b, 1, *size)[:, 0]
        if self.allow_overlap:
            return cand
        out = torch.zeros_like(cand)
        fails = torch.zeros(b, dtype=torch.long)
        pending = torch.ones(b, dtype=torch.bool)
        order = torch.arange(self.npred)
        while True:
            relax = torch.clamp(fails // _RELAX_EVERY, max=self.npred)
            active = order[None, :] < (self.npred - relax)[:, None]  # constraints still in force
            blocked = (targets & active[:, :, None, None]).any(1)
            masked = cand & ~blocked
            valid = pending & (masked.flatten(1).sum(1) > self.min_keep)
            out[valid] = masked[valid]
            pending &= ~valid
            if not pending.any():
                return out
            redo = pending.nonzero().squeeze(1)
            cand[redo] = self._boxes(g, len(redo), 1, *size)[:, 0]
            fails[redo] += 1

    @staticmethod
    def _indices(masks: torch.Tensor, keep: int) -> torch.Tensor:
        """(B, H, W) boolean -> (B, keep) ascending raster indices of the first ``keep`` set patches."""
        flat = masks.flatten(1)
        order = torch.sort((~flat).to(torch.uint8), dim=1, stable=True).indices
        return order[:, :keep].contiguous()

    # -- public API ------------------------------------------------------------------------------
    def sample(self, batch_size: int, step: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Masks for one batch.

        Args:
            batch_size: B.
            step: global step (with seed and rank, fixes every draw).
        Returns:
            (masks_enc, masks_pred): lists of ``nenc`` LongTensors (B, K_enc) and ``npred`` (B, K_pred).
        """
        g_size = torch.Generator().manual_seed(_seed(self.seed, step))
        p_size = self._block_size(g_size, self.pred_mask_scale, self.aspect_ratio)
        e_size = self._block_size(g_size, self.enc_mask_scale, (1.0, 1.0))
        g = torch.Generator().manual_seed(_seed(self.seed, step, self.rank))
        targets = self._boxes(g, batch_size, self.npred, *p_size)
        contexts = torch.stack([self._context_block(g, targets, e_size) for _ in range(self.nenc)], dim=1)
        k_pred = p_size[0] * p_size[1]
        k_enc = int(contexts.flatten(2).sum(-1).min())
        masks_pred = [self._indices(targets[:, i], k_pred) for i in range(self.npred)]
        masks_enc = [self._indices(contexts[:, i], k_enc) for i in range(self.nenc)]
        return masks_enc, masks_pred

    def set_start_step(self, step: int) -> None:
        """Make the next batch use global step ``step`` (call before creating a loader iterator)."""
        self._start, self._calls = int(step), 0

    def next_step(self) -> int:
        """The step of the next call in this process (DataLoader worker aware)."""
        info = get_worker_info()
        workers, wid = (info.num_workers, info.id) if info is not None else (1, 0)
        step = self._start + self._calls * workers + wid
        self._calls += 1
        return step

    def __call__(self, batch: list) -> tuple:
        """DataLoader collate: ``(default_collate(batch), masks_enc, masks_pred)``."""
        collated = default_collate(batch)
        masks_enc, masks_pred = self.sample(len(batch), self.next_step())
        return collated, masks_enc, masks_pred
