"""Multi-block collator: sizes, counts, non-overlap, coverage of the last row/column, determinism."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ijepa.masks import MultiBlockMaskCollator

PAPER = dict(
    enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), nenc=1, npred=4, min_keep=10
)


def to_sets(mask: torch.Tensor) -> list[set[int]]:
    return [set(row.tolist()) for row in mask]


@pytest.mark.parametrize(("img", "patch"), [(224, 16), (224, 14), (32, 4)])
def test_shapes_counts_and_index_validity(img, patch):
    c = MultiBlockMaskCollator(img, patch, **(PAPER if img > 32 else PAPER | {"min_keep": 4}))
    n = (img // patch) ** 2
    for step in range(20):
        enc, pred = c.sample(16, step)
        assert len(enc) == 1 and len(pred) == 4
        assert all(m.dtype == torch.int64 and m.shape[0] == 16 for m in enc + pred)
        assert len({m.shape[1] for m in pred}) == 1  # every target mask truncated to one size
        for m in enc + pred:
            assert m.min() >= 0 and m.max() < n
            assert torch.all(m[:, 1:] > m[:, :-1])  # unique, ascending raster order
        assert enc[0].shape[1] > c.min_keep and pred[0].shape[1] > c.min_keep


def test_context_never_overlaps_targets():
    c = MultiBlockMaskCollator(224, 16, **PAPER)
    for step in range(30):
        enc, pred = c.sample(32, step)
        for b in range(32):
            ctx = set(enc[0][b].tolist())
            # truncation only drops patches, so the full target blocks must be disjoint from the context
            for p in pred:
                assert not ctx & set(p[b].tolist())


def test_allow_overlap_lets_context_cover_targets():
    c = MultiBlockMaskCollator(224, 16, **(PAPER | {"allow_overlap": True}))
    overlap = 0
    for step in range(10):
        enc, pred = c.sample(8, step)
        overlap += sum(len(set(enc[0][b].tolist()) & set(pred[0][b].tolist())) for b in range(8))
    assert overlap > 0


def test_block_sizes_match_official_statistics():
    # Reference §1.3: at 224/16 the target blocks are 5x6, 6x5, 6x6, 7x5 or 8x5 -> K_pred in {30, 35, 36, 40}.
    c = MultiBlockMaskCollator(224, 16, **PAPER)
    sizes = {c.sample(2, s)[1][0].shape[1] for s in range(300)}
    assert sizes <= {30, 35, 36, 40} and len(sizes) >= 3


def test_last_row_and_column_are_used():
    c = MultiBlockMaskCollator(224, 16, **PAPER)
    last = {13 * 14 + j for j in range(14)} | {i * 14 + 13 for i in range(14)}
    seen_ctx, seen_tgt = set(), set()
    for step in range(40):
        enc, pred = c.sample(16, step)
        seen_ctx |= set(enc[0].flatten().tolist()) & last
        seen_tgt |= set(torch.cat(pred).flatten().tolist()) & last
    assert seen_ctx and seen_tgt  # upstream never masks these patches (PR #40/#59, issue #60)
    assert 195 in seen_tgt  # the bottom-right patch itself


def test_determinism_by_step_seed_and_rank():
    a = MultiBlockMaskCollator(224, 16, **PAPER)
    b = MultiBlockMaskCollator(224, 16, **PAPER)
    for x, y in zip(a.sample(8, 5)[1], b.sample(8, 5)[1], strict=True):
        assert torch.equal(x, y)
    assert not all(torch.equal(x, y) for x, y in zip(a.sample(8, 5)[1], a.sample(8, 6)[1], strict=True))
    r1 = MultiBlockMaskCollator(224, 16, rank=1, **PAPER)
    p0, p1 = a.sample(8, 5)[1], r1.sample(8, 5)[1]
    assert p0[0].shape == p1[0].shape  # sizes shared across ranks
    assert not all(torch.equal(x, y) for x, y in zip(p0, p1, strict=True))  # positions differ
    s1 = MultiBlockMaskCollator(224, 16, seed=1, **PAPER)
    assert not all(torch.equal(x, y) for x, y in zip(a.sample(8, 5)[1], s1.sample(8, 5)[1], strict=True))


@pytest.mark.parametrize("workers", [0, 2])
def test_dataloader_steps_follow_batch_order(workers):
    c = MultiBlockMaskCollator(32, 4, **(PAPER | {"min_keep": 4}))
    c.set_start_step(7)
    data = [(torch.zeros(3, 32, 32), i) for i in range(24)]
    loader = DataLoader(data, batch_size=4, collate_fn=c, num_workers=workers)
    for i, ((imgs, labels), enc, pred) in enumerate(loader):
        assert imgs.shape == (4, 3, 32, 32) and labels.tolist() == list(range(4 * i, 4 * i + 4))
        ref_enc, ref_pred = c.sample(4, 7 + i)
        assert all(torch.equal(x, y) for x, y in zip(enc + pred, ref_enc + ref_pred, strict=True))


def test_impossible_settings_fail_at_construction_instead_of_hanging():
    # Upstream hangs here forever (reference §1.3): 8x8 grid, 3x3 targets, min_keep 10.
    with pytest.raises(ValueError, match=r"pred_mask_scale=\[0.15, 0.2\] on a 8x8 patch grid.*min_keep=10"):
        MultiBlockMaskCollator(64, 8, **PAPER)
    with pytest.raises(ValueError, match="enc_mask_scale"):
        MultiBlockMaskCollator(224, 16, **(PAPER | {"enc_mask_scale": (0.001, 0.01)}))
    with pytest.raises(ValueError, match="pred_mask_scale"):
        MultiBlockMaskCollator(224, 16, **(PAPER | {"pred_mask_scale": (0.2, 1.5)}))
    with pytest.raises(ValueError, match="aspect_ratio"):
        MultiBlockMaskCollator(224, 16, **(PAPER | {"aspect_ratio": (2.0, 1.0)}))
    with pytest.raises(ValueError, match="not divisible"):
        MultiBlockMaskCollator(225, 16, **PAPER)
    with pytest.raises(ValueError, match="npred"):
        MultiBlockMaskCollator(224, 16, **(PAPER | {"npred": 0}))


def test_hard_constraints_relax_and_terminate():
    # Big targets leave little room: upstream's relaxation (drop the last target constraint every 20
    # failures) must kick in, and every context still keeps more than min_keep patches.
    c = MultiBlockMaskCollator(
        64, 8, enc_mask_scale=(0.3, 0.3), pred_mask_scale=(0.45, 0.5), aspect_ratio=(1, 1), npred=4, min_keep=12
    )
    for step in range(10):
        enc, _ = c.sample(16, step)
        assert enc[0].shape[1] > 12
