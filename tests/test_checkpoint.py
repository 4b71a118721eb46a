"""Checkpoints: official layout both ways, metadata, inference from tensors, atomic saves, bad files."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch

from ijepa import CheckpointError, create_encoder, create_predictor, load_encoder, read_checkpoint
from ijepa.checkpoint import (
    META_KEY,
    atomic_save,
    build_from_checkpoint,
    clean_state_dict,
    load_training_state,
    save_checkpoint,
)
from ijepa.engine import build_optimizer
from ijepa.jepa import JEPA


def make_jepa(depth=2, pred_depth=2, img=32, patch=8):
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", patch_size=patch, img_size=img, depth=depth)
    pred = create_predictor("vit_tiny", patch_size=patch, img_size=img, depth=pred_depth, predictor_embed_dim=48)
    return JEPA(enc, pred)


def official_file(jepa, path: Path, epoch=3):
    """A file in exactly the layout upstream's train.py writes (no metadata)."""
    state = {
        k: {f"module.{n}": t for n, t in getattr(jepa, k).state_dict().items()}
        for k in ("encoder", "predictor", "target_encoder")
    }
    state.update(
        opt=build_optimizer(jepa).state_dict(), scaler=None, epoch=epoch, loss=0.4, batch_size=4, world_size=1, lr=1e-3
    )
    torch.save(state, path)
    return path


def test_round_trip_ours(tmp_path):
    jepa = make_jepa()
    with torch.no_grad():
        jepa.target_encoder.blocks[0].attn.qkv.weight.add_(0.5)  # make target differ from context encoder
    opt = build_optimizer(jepa)
    path = tmp_path / "jepa-latest.pth.tar"
    save_checkpoint(
        path,
        encoder=jepa.encoder,
        predictor=jepa.predictor,
        target_encoder=jepa.target_encoder,
        optimizer=opt,
        step=12,
        epoch=3,
        params={"lr": 1e-3},
    )
    raw = torch.load(path, weights_only=True)
    assert set(raw) >= {"encoder", "predictor", "target_encoder", "opt", "scaler", "epoch", META_KEY}
    assert all(k.startswith("module.") for k in raw["encoder"])  # upstream's loader needs the DDP prefix
    meta = raw[META_KEY]
    assert meta["format_version"] == 1 and meta["step"] == 12 and meta["encoder"]["patch_size"] == 8
    x = torch.randn(2, 3, 32, 32)
    for which in ("target_encoder", "encoder"):
        enc = load_encoder(path, which=which)
        assert not enc.training
        with torch.no_grad():
            assert torch.equal(enc(x), getattr(jepa, which).eval()(x))


def test_official_file_loads_and_arch_is_inferred(tmp_path):
    jepa = make_jepa(depth=3, img=48, patch=16)
    path = official_file(jepa, tmp_path / "IN1K-vit.t.16.pth.tar")
    enc = load_encoder(path)  # target_encoder by default, the paper's choice
    assert (enc.depth, enc.embed_dim, enc.num_heads, enc.patch_size, enc.img_size) == (3, 192, 3, 16, (48, 48))
    x = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        assert (enc(x) - jepa.target_encoder.eval()(x)).abs().max() <= 1e-5
    _, _, pred_arch = build_from_checkpoint(path)
    assert pred_arch["depth"] == 2 and pred_arch["predictor_embed_dim"] == 48 and pred_arch["num_heads"] == 3


def test_our_file_loads_the_official_way(tmp_path):
    """Upstream's loader: strict load_state_dict of the module.-prefixed dicts, then opt.load_state_dict."""
    jepa = make_jepa()
    opt = build_optimizer(jepa)
    path = tmp_path / "ours.pth.tar"
    save_checkpoint(
        path,
        encoder=jepa.encoder,
        predictor=jepa.predictor,
        target_encoder=jepa.target_encoder,
        optimizer=opt,
        step=4,
        epoch=1,
    )
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    fresh = make_jepa()
    wrapped = torch.nn.ModuleDict({"module": fresh.encoder})  # same key prefix as a DDP wrapper
    wrapped.load_state_dict(ckpt["encoder"], strict=True)
    fresh_opt = build_optimizer(fresh)
    fresh_opt.load_state_dict(ckpt["opt"])
    groups = ckpt["opt"]["param_groups"]
    assert [len(g["params"]) for g in groups] == [2 + 4 * 2, 3 + 4 * 2 + 1, 1 + 8 * 2 + 2, 1 + 8 * 2 + 2 + 1]
    assert [g["WD_exclude"] for g in groups] == [False, False, True, True]


def test_official_group_sizes_for_vit_tiny():
    # Reference §1.5: vit_tiny with a 2-deep predictor -> [50, 12, 99, 20].
    jepa = make_jepa(depth=12, pred_depth=2)
    assert [len(g["params"]) for g in jepa.param_groups()] == [50, 12, 99, 20]


def test_bare_state_dict_and_prefix_cleaning(tmp_path):
    enc = create_encoder("vit_tiny", patch_size=8, img_size=32, depth=1)
    sd = {f"_orig_mod.module.{k}": v for k, v in enc.state_dict().items()}
    assert set(clean_state_dict(sd)) == set(enc.state_dict())
    torch.save(sd, tmp_path / "bare.pth")
    assert load_encoder(tmp_path / "bare.pth").depth == 1


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path):
    jepa = make_jepa()
    path = official_file(jepa, tmp_path / "a.pth.tar")
    ckpt = torch.load(path, weights_only=True)
    del ckpt["target_encoder"]["module.norm.bias"]
    ckpt["target_encoder"]["module.extra.weight"] = torch.zeros(1)
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"missing keys: norm\.bias.*unexpected keys: extra\.weight"):
        load_encoder(path)
    ckpt = torch.load(official_file(jepa, tmp_path / "b.pth.tar"), weights_only=True)
    fresh = make_jepa()
    ckpt["predictor"]["module.mask_token"] = torch.zeros(1, 1, 64)
    torch.save(ckpt, tmp_path / "b.pth.tar")
    with pytest.raises(CheckpointError, match=r"\[predictor\].*shape mismatches: mask_token: file \(1, 1, 64\)"):
        load_training_state(
            tmp_path / "b.pth.tar",
            encoder=fresh.encoder,
            predictor=fresh.predictor,
            target_encoder=fresh.target_encoder,
        )


class Evil:
    def __reduce__(self):
        return (print, ("this would run arbitrary code",))


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match=r"does not exist"):
        read_checkpoint(tmp_path / "nope.pth.tar")
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth is not a torch checkpoint, or it is corrupt"):
        read_checkpoint(tmp_path / "empty.pth")
    (tmp_path / "notes.txt").write_text("hello, not a checkpoint\n")
    with pytest.raises(CheckpointError, match=r"notes.txt is not a torch checkpoint, or it is corrupt") as e:
        read_checkpoint(tmp_path / "notes.txt")
    assert "weights_only=False" not in str(e.value)
    good = tmp_path / "good.pth"
    official_file(make_jepa(), good)
    (tmp_path / "trunc.pth").write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match=r"trunc.pth"):
        load_encoder(tmp_path / "trunc.pth")
    torch.save({"encoder": {"x": Evil()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match=r"evil.pth is refused: loading it needs arbitrary unpickling") as e:
        read_checkpoint(tmp_path / "evil.pth")
    assert "weights_only=False" not in str(e.value) and "(it asks for print)" in str(e.value)
    torch.save({"encoder": {"x": Evil()}}, tmp_path / "evil_legacy.pth", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"evil_legacy.pth is refused: .*arbitrary unpickling"):
        read_checkpoint(tmp_path / "evil_legacy.pth")
    torch.save({"embeddings": torch.zeros(2)}, tmp_path / "partial.pt")
    with pytest.raises(CheckpointError, match=r"partial.pt is not a search index: it lacks keys, labels"):
        read_checkpoint(tmp_path / "partial.pt", what="search index", keys=("embeddings", "keys", "labels"))
    (tmp_path / "pickled.pkl").write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(CheckpointError, match=r"pickled.pkl"):
        read_checkpoint(tmp_path / "pickled.pkl")
    torch.save({"foo": 1}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"has no 'target_encoder' entry"):
        load_encoder(tmp_path / "other.pth")
    wide = create_encoder("vit_tiny", patch_size=8, img_size=32, depth=1, embed_dim=200, num_heads=4)
    torch.save(wide.state_dict(), tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match="width 200 matches no official preset; pass num_heads"):
        load_encoder(tmp_path / "wide.pth")
    assert load_encoder(tmp_path / "wide.pth", num_heads=4).embed_dim == 200


def test_atomic_save_keeps_the_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "jepa-latest.pth.tar"
    atomic_save({"v": torch.ones(3)}, path)
    before = path.read_bytes()

    def dying_save(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # a kill in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"v": torch.zeros(3)}, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary left behind


def test_cli_inspect_and_models(tmp_path, capsys):
    from ijepa.cli import main

    path = official_file(make_jepa(), tmp_path / "official.pth.tar")
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert '"format": "official I-JEPA (no metadata; inferred)"' in out and '"depth": 2' in out
    assert main(["inspect", str(tmp_path / "missing.pth")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["models"]) == 0
    assert "vit_giant" in capsys.readouterr().out
