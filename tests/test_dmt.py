"""DMT-JEPA: neighbour selection (borders included), a training step, checkpoint round trip, exact resume."""

from __future__ import annotations

import pytest
import torch

from ijepa.checkpoint import CheckpointError, load_training_state
from ijepa.dmt import DMTJEPA, LocalAggregationHead, select_neighbours, window_candidates
from ijepa.pretrain import ModelSpec, build_jepa, pretrain

from .conftest import TINY, step_batches, tiny_collator

DMT = ModelSpec(**{**TINY.__dict__, "objective": {"name": "dmt_jepa", "window": 3, "k": 4, "depth": 2}})


def test_window_candidates_have_no_wrap_around():
    idx, valid = window_candidates((4, 5), 3)
    assert idx.shape == (20, 8)
    assert set(idx[0][valid[0]].tolist()) == {1, 5, 6}  # top-left corner: 3 real neighbours
    assert set(idx[7][valid[7]].tolist()) == {1, 2, 3, 6, 8, 11, 12, 13}  # an inner patch: all 8
    assert set(idx[19][valid[19]].tolist()) == {13, 14, 18}  # bottom-right corner
    assert not (idx[0][valid[0]] == 0).any()  # never itself
    with pytest.raises(ValueError, match="odd"):
        window_candidates((4, 4), 4)


def test_neighbour_selection_on_a_hand_made_feature_map():
    # 3x3 grid, 2-D features: patch 4 (centre) points along x; its neighbours at various angles.
    angles = torch.tensor([90.0, 10.0, 80.0, 20.0, 0.0, 170.0, 30.0, 100.0, 5.0])
    feats = torch.stack([torch.cos(torch.deg2rad(angles)), torch.sin(torch.deg2rad(angles))], dim=1)[None]
    cand, valid = window_candidates((3, 3), 3)
    idx, ok = select_neighbours(feats, cand, valid, k=4)
    assert idx[0, 4].tolist() == [8, 1, 3, 6]  # 5, 10, 20, 30 degrees away: most similar first
    assert ok[0, 4].all()
    # corner patch 0 (90 degrees) has only 1, 3, 4 as candidates: the 4th slot is invalid, never wrapped
    assert sorted(idx[0, 0][ok[0, 0]].tolist()) == [1, 3, 4] and ok[0, 0].sum() == 3


def test_targets_use_each_images_own_query():
    head = LocalAggregationHead(8, 2, (3, 3), window=3, k=4, depth=2).eval()
    h = torch.randn(3, 9, 8)
    both = head.targets(h)
    for b in range(3):  # aligned queries: an image's targets do not depend on the other images
        assert torch.allclose(both[b], head.targets(h[b : b + 1])[0], atol=1e-5)
    assert head.context(torch.randn(2, 5, 8)).shape == (2, 5, 8)


def test_training_step_shapes_ema_and_groups():
    torch.manual_seed(0)
    jepa = build_jepa(DMT, seed=0)
    assert isinstance(jepa, DMTJEPA) and jepa.extra_modules == ("head", "target_head")
    enc, pred = tiny_collator().sample(4, 0)
    out = jepa(torch.randn(4, 3, 32, 32), enc, pred)
    assert out["pred"].shape == out["target"].shape == (16, pred[0].shape[1], 192)
    out["loss"].backward()
    assert jepa.head.blocks[0].attn.q.weight.grad is not None
    assert all(p.grad is None for p in jepa.target_head.parameters())
    before = jepa.target_head.blocks[0].attn.q.weight.clone()
    with torch.no_grad():
        jepa.head.blocks[0].attn.q.weight.add_(1.0)
    jepa.update_target(0.9)
    assert torch.allclose(
        jepa.target_head.blocks[0].attn.q.weight, 0.9 * before + 0.1 * jepa.head.blocks[0].attn.q.weight
    )
    groups = jepa.param_groups()
    assert len(groups) == 6 and groups[5]["WD_exclude"] and groups[4]["params"]


def test_checkpoint_round_trip_and_exact_resume_with_heads(tmp_path, tiny_optim):
    make = step_batches(tiny_collator())
    cpu = torch.device("cpu")
    full = []
    pretrain(
        model=DMT,
        optim=tiny_optim,
        ipe=3,
        batch_size=4,
        make_batches=make,
        out_dir=tmp_path / "a",
        device=cpu,
        on_step=lambda log: full.append(log.loss),
    )

    def stop_after_first_epoch(epoch, start):
        if epoch == 1:
            raise KeyboardInterrupt
        yield from make(epoch, start)

    with pytest.raises(KeyboardInterrupt):
        pretrain(
            model=DMT,
            optim=tiny_optim,
            ipe=3,
            batch_size=4,
            make_batches=stop_after_first_epoch,
            out_dir=tmp_path / "b",
            device=cpu,
        )
    ckpt_path = tmp_path / "b/jepa-latest.pth.tar"
    ckpt = torch.load(ckpt_path, weights_only=True)
    assert "head" in ckpt and "target_head" in ckpt and ckpt["ijepa_meta"]["params"]["model"]["objective"]["k"] == 4
    fresh = build_jepa(DMT, seed=1)
    load_training_state(
        ckpt_path,
        encoder=fresh.encoder,
        predictor=fresh.predictor,
        target_encoder=fresh.target_encoder,
        extra={"head": fresh.head, "target_head": fresh.target_head},
    )
    assert torch.equal(fresh.head.blocks[1].mlp.fc1.weight, ckpt["head"]["blocks.1.mlp.fc1.weight"])
    resumed = []
    pretrain(
        model=DMT,
        optim=tiny_optim,
        ipe=3,
        batch_size=4,
        make_batches=make,
        out_dir=tmp_path / "b",
        device=cpu,
        on_step=lambda log: resumed.append(log.loss),
    )
    assert resumed == full[3:]  # heads restored: bit-identical continuation
    del ckpt["head"]
    torch.save(ckpt, tmp_path / "nohead.pth.tar")
    with pytest.raises(CheckpointError, match="has no 'head' entry"):
        load_training_state(
            tmp_path / "nohead.pth.tar",
            encoder=fresh.encoder,
            predictor=fresh.predictor,
            target_encoder=fresh.target_encoder,
            extra={"head": fresh.head},
        )
